"""The tangent plan and the factored tangent features it describes: which parameters are differentiated by which
exact method (see `tangents`), and the features of a batch in factored form."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from ntk_explain.errors import UsageError

OUTPUTS = ("logits", "pseudo")


PATHS = ("batched", "vmap", "loop")


_NAMES = ("weight", "bias")


@dataclass(frozen=True)
class Layer:
    """A layer whose weight gradient is Σ_s δ_s ã_sᵀ over S sites per sample."""

    module: str
    weight: str | None  # parameter name when selected
    bias: str | None
    in_features: int  # d_in (conv: C_in/groups·Π kernel)
    out_features: int  # d_out
    sites: int  # S
    call_shapes: tuple[tuple[int, ...], ...]  # output shape of each call, batch of one
    broadcast: tuple[bool, ...] = ()  # per call: its input and output have a batch axis of 1, broadcast over the batch


@dataclass(frozen=True)
class Lookup:
    """An embedding whose weight gradient is Σ_s δ_s e_{i_s}ᵀ (rows × features) over S sites (indices × calls)."""

    module: str
    weight: str
    rows: int  # V
    features: int  # d
    sites: int  # S
    call_shapes: tuple[tuple[int, ...], ...]
    broadcast: tuple[bool, ...] = ()
    padding_idx: int | None = None  # the row whose gradient is zero


@dataclass(frozen=True)
class Affine:
    """A normalisation layer y_s = γ ⊙ x̂_s + β at every site s, γ and β of `channels` entries."""

    module: str
    weight: str | None  # γ's name when selected
    bias: str | None  # β's
    channels: int
    call_shapes: tuple[tuple[int, ...], ...]
    broadcast: tuple[bool, ...] = ()


@dataclass(frozen=True)
class TangentPlan:
    """Which parameters are differentiated, and by which method.

    `params` holds every selected parameter in `named_parameters()` order (shared tensors once);
    it fixes the global coordinate order of θ used by projections. `dense` lists, in that order, the
    parameters whose gradients are columns of `Factors.dense`: those of `jacobian`, `formed` and `affines`.
    `generic` gives the reason each `jacobian` parameter is not structured; `check` the self-check's figures.
    """

    params: dict[str, Tensor]
    layers: tuple[Layer, ...]  # factorised
    formed: tuple[Layer, ...]  # factorisable, but their gradients are formed: Σ_s δ_s ã_sᵀ
    lookups: tuple[Lookup, ...]
    affines: tuple[Affine, ...]
    fixed: dict[str, Tensor]  # unselected parameters and buffers, passed as they are
    outputs: int  # K
    output: str  # "logits" | "pseudo"
    dtype: torch.dtype  # of the logits, hence of every tangent feature
    activation_numel: int  # Σ numel of module outputs for one sample (memory estimate)
    formed_lookups: tuple[Lookup, ...] = ()  # lookups whose gradients are formed: rows Σ_{s: i_s = j} δ_s
    path: str = "batched"  # PATHS
    generic: Mapping[str, str] = field(default_factory=dict)
    check: Mapping[str, float | str] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def dense(self) -> tuple[str, ...]:
        """The parameters that are not factorised nor lookups, in `params` order."""
        own = {n for layer in self.layers for n in (layer.weight, layer.bias)} | {e.weight for e in self.lookups}
        return tuple(name for name in self.params if name not in own)

    @property
    def jacobian(self) -> tuple[str, ...]:
        """The dense parameters of the generic path (those of `formed`, `formed_lookups` and `affines` are formed
        from δ)."""
        formed = {getattr(m, key, None) for m in (*self.formed, *self.formed_lookups, *self.affines) for key in _NAMES}
        return tuple(name for name in self.dense if name not in formed)

    @property
    def structured(self) -> tuple[Layer | Lookup | Affine, ...]:
        """Every module whose output gradient δ is taken: the layers, the formed layers, the lookups, the formed
        lookups, the affines."""
        return (*self.layers, *self.formed, *self.lookups, *self.formed_lookups, *self.affines)

    def offsets(self) -> dict[str, int]:
        """Offset of each parameter's first coordinate in θ (flattened, `params` order)."""
        offsets, start = {}, 0
        for name, p in self.params.items():
            offsets[name] = start
            start += p.numel()
        return offsets


def select_parameters(model: nn.Module, globs: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Trainable parameters whose name matches one of `globs` (all when None), shared ones once."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not globs:
        return named
    chosen = {n: p for n, p in named.items() if any(fnmatchcase(n, g) for g in globs)}
    if not chosen:
        raise UsageError(f"--params {','.join(globs)} matched no parameter (have: {', '.join(named)})")
    return chosen


def output_map(logits: Tensor, output: str) -> Tensor:
    """o(x) (..., K): the logits (..., C) (K = C) or their scaled sum Σ_c f_c/√C (K = 1)."""
    if output == "pseudo":
        return logits.sum(-1, keepdim=True) / math.sqrt(logits.shape[-1])
    return logits
