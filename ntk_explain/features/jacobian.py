"""Per-sample Jacobians formed from tangent features, and the features of a weighted sum of weight states.

J(x) (n, K, P) over the plan's parameters (`plan.params` order, each flattened): the dense columns as they are, a
factorised layer's weight block Σ_s δ_s ã_sᵀ and bias Σ_s δ_s, a lookup's rows Σ_{s: i_s = j} δ_s. Tangent features
are linear in their sites, so Σ_q ω_q g(x; w_q) over weight states w_q is again a set of factors: the dense columns
summed with the weights ω_q, the sites of every state joined with δ scaled by ω_q (`weighted_sum`); its Jacobian
forms each factorised layer's outer products once, for all states together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ntk_explain.features.plan import TangentPlan
from ntk_explain.features.tangents import lookup_columns
from ntk_explain.kernel.factors import Factors


def weighted_sum(parts: Sequence[Factors], weights: Sequence[float | Tensor]) -> Factors:
    """The factors of Σ_q ω_q g_q(x) from those of each g_q (the same samples and plan): dense columns summed, δ
    scaled by ω_q and every state's sites joined (δ along axis 2, inputs and lookup indices along axis 1)."""
    pairs = list(zip(parts, weights, strict=True))
    dense = pairs[0][0].dense * float(pairs[0][1])
    for part, weight in pairs[1:]:
        dense.add_(part.dense, alpha=float(weight))

    def joined(pick: str, axis: int, scaled: bool) -> tuple[Tensor, ...]:
        layers = zip(*[[w * t if scaled else t for t in getattr(p, pick)] for p, w in pairs], strict=True)
        return tuple(torch.cat(tensors, dim=axis) for tensors in layers)

    return Factors(
        dense=dense,
        deltas=joined("deltas", 2, True),
        inputs=joined("inputs", 1, False),
        lookup_deltas=joined("lookup_deltas", 2, True),
        indices=joined("indices", 1, False),
    )


def jacobian(plan: TangentPlan, factors: Factors) -> Tensor:
    """J (n, K, P) of the plan's parameters, in `plan.params` order, each flattened as `Tensor.reshape(-1)` does."""
    n, k = factors.n, plan.outputs
    out = factors.dense.new_empty((n, k, plan.n_params))
    offsets = plan.offsets()
    start = 0
    for name in plan.dense:
        size = plan.params[name].numel()
        out[:, :, offsets[name] : offsets[name] + size] = factors.dense[:, :, start : start + size]
        start += size
    for layer, delta, inputs in zip(plan.layers, factors.deltas, factors.inputs, strict=True):
        formed = torch.einsum("nksd,nse->nkde", delta, inputs)  # (n, K, d_out, d_in')
        if layer.weight:
            at, size = offsets[layer.weight], layer.out_features * layer.in_features
            block = out[:, :, at : at + size].view(n, k, layer.out_features, layer.in_features)
            block.copy_(formed[..., : layer.in_features])
        if layer.bias:
            out[:, :, offsets[layer.bias] : offsets[layer.bias] + layer.out_features] = formed[..., -1]
    for lookup, delta, rows in zip(plan.lookups, factors.lookup_deltas, factors.indices, strict=True):
        out[:, :, offsets[lookup.weight] : offsets[lookup.weight] + lookup.rows * lookup.features] = lookup_columns(
            lookup, delta, rows
        )
    return out
