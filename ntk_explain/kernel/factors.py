"""Tangent features of n samples in factored form, as `features` computes them and `kernel` contracts them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Factors:
    """Tangent features of n samples.

    dense: (n, K, P_dense) gradients of the dense parameters, in `plan.dense` order.
    deltas[l]: (n, K, S_l, d_out) output gradients; inputs[l]: (n, S_l, d_in') layer inputs
    (with a trailing 1 when the bias is selected; only the 1 when the weight is not).
    lookup_deltas[e]: (n, K, S_e, d) output gradients of lookup e; indices[e]: (n, S_e) its rows i_s.
    """

    dense: Tensor
    deltas: tuple[Tensor, ...]
    inputs: tuple[Tensor, ...]
    lookup_deltas: tuple[Tensor, ...] = ()
    indices: tuple[Tensor, ...] = ()

    @property
    def n(self) -> int:
        return self.dense.shape[0]

    @staticmethod
    def joined(parts: list[Factors]) -> Factors:
        """The features of consecutive batches as one: every tensor joined along the samples."""

        def cat(tensors: tuple[tuple[Tensor, ...], ...]) -> tuple[Tensor, ...]:
            return tuple(torch.cat(group) for group in zip(*tensors, strict=True))

        return Factors(
            torch.cat([p.dense for p in parts]),
            cat(tuple(p.deltas for p in parts)),
            cat(tuple(p.inputs for p in parts)),
            cat(tuple(p.lookup_deltas for p in parts)),
            cat(tuple(p.indices for p in parts)),
        )
