"""Sketches of factored tangent features that never form a factorised layer's gradient: the layout of a sketch (its
groups and their shares of d) and the sketched features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ntk_explain.features.plan import TangentPlan
from ntk_explain.features.projections import (
    Projection,
    count_sketch,
    hashes,
    kronecker_sketch,
    lookup_sketch,
    sketch_shares,
    tensor_sketch,
)
from ntk_explain.kernel.factors import Factors
from ntk_explain.kernel.grams import factor_gram, lookup_gram


@dataclass(frozen=True)
class SketchLayout:
    """The groups of a sketch and their shares of d (`sketch_layout`).

    Groups, in order: the generic one (dense columns and lookups, when there are any), then three per factorised
    layer. With unit directions u (d_out) and v (d_in') of the layer, its gradient G = Σ_s δ_s ã_sᵀ splits into
    orthogonal pieces G = uuᵀG + (I − uuᵀ)Gvvᵀ + (I − uuᵀ)G(I − vvᵀ): the **rows** uᵀG (d_in'), the **columns**
    (I − uuᵀ)Gv (d_out), each kept exactly or CountSketched, and the **rest**, TensorSketched (or Kronecker-projected)
    from its factors ((I − uuᵀ)δ_s, (I − vvᵀ)ã_s). As the pieces are orthogonal, ⟨G, G'⟩ is the sum of theirs, so
    features that estimate each piece's without bias estimate ⟨G, G'⟩ without bias, whatever u and v are.
    """

    dims: tuple[int, ...]  # per group
    exact: tuple[bool, ...]  # kept as it is (dims = its size), else sketched
    directions: tuple[tuple[Tensor, Tensor], ...]  # (u, v) per factorised layer

    @property
    def groups(self) -> list[str]:
        """Group names: `generic`, then `<layer>/rows`, `<layer>/columns`, `<layer>/rest` by layer number."""
        layers = [f"{index}/{piece}" for index in range(len(self.directions)) for piece in ("rows", "columns", "rest")]
        return ["generic"] * (len(self.dims) - len(layers)) + layers


def sketch_directions(factors: Factors) -> tuple[tuple[Tensor, Tensor], ...]:
    """Per factorised layer, the unit mean directions u = Σ δ_ks / ‖Σ δ_ks‖ and v = Σ ã_s / ‖Σ ã_s‖ over the samples,
    outputs and sites of `factors` (0 where the sum is 0). For correlated samples (ReLU activations, shared output
    gradients) much of each gradient lies along them."""
    return tuple(
        (F.normalize(delta.sum((0, 1, 2)), dim=0), F.normalize(inputs.sum((0, 1)), dim=0))
        for delta, inputs in zip(factors.deltas, factors.inputs, strict=True)
    )


def _pieces(delta: Tensor, inputs: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rows uᵀG (n, K, d_in') and columns (I − uuᵀ)Gv (n, K, d_out) of G = Σ_s δ_s ã_sᵀ for δ (n, K, S, d_out)
    and ã (n, S, d_in'), and the factors (I − uuᵀ)δ, (I − vvᵀ)ã of the rest."""
    along, at = delta @ u, inputs @ v  # (n, K, S), (n, S)
    across = delta - along[..., None] * u
    rows = torch.einsum("nks,nsi->nki", along, inputs)
    return rows, torch.einsum("nkso,ns->nko", across, at), across, inputs - at[..., None] * v


def sketch_layout(factors: Factors, dim: int, kind: str) -> SketchLayout:
    """The layout of a `kind` sketch of d = `dim` from the tangent features of the probe rows: the layers' directions
    (`sketch_directions`), then every group's energy Σ_x ‖g(x)‖² shares out d (`sketch_shares`; a group may be kept
    exactly if it has a fixed size: the generic one without lookups, the rows, the columns)."""
    directions = sketch_directions(factors)
    energies, sizes, fast = [], [], []
    if _generic(factors):
        lookups = zip(factors.lookup_deltas, factors.indices, strict=True)
        energies.append(
            float(factors.dense.square().sum())
            + sum(float(lookup_gram(d, i, None, None, "trace").sum()) for d, i in lookups)
        )
        sizes.append(None if factors.lookup_deltas else factors.dense.shape[-1])
        fast.append(False)
    for (delta, inputs), (u, v) in zip(zip(factors.deltas, factors.inputs, strict=True), directions, strict=True):
        rows, columns, across, off = _pieces(delta, inputs, u, v)
        rest = float(factor_gram(across, off, None, None, "trace").sum())
        energies += [float(rows.square().sum()), float(columns.square().sum()), rest]
        sizes += [rows.shape[-1], columns.shape[-1], None]
        fast += [False, False, kind == "tensorsketch"]
    dims, exact = sketch_shares(dim, energies, sizes, fast)
    return SketchLayout(tuple(dims), tuple(exact), directions)


def _generic(factors: Factors) -> bool:
    """Whether the sketch has a generic group: dense columns (affine parameters among them) or lookups."""
    return bool(factors.dense.shape[-1] or factors.lookup_deltas)


def sketch(plan: TangentPlan, factors: Factors, projection: Projection, layout: SketchLayout) -> Tensor:
    """Sketched features (n, K, d), the groups of `layout` concatenated: the generic group's CountSketch (the dense
    gradients, affine parameters included, plus every lookup's by `lookup_sketch`, each hashed independently into
    the same share) or its columns as they are, then every factorised layer's rows and columns (each as it is or
    CountSketched) and rest (TensorSketch or Kronecker). Group g hashes with streams 2g (and 2g + 1), lookup e with
    2(G + e) for G groups."""
    layer_sketch = tensor_sketch if projection.kind == "tensorsketch" else kronecker_sketch
    seed, dims = projection.seed, layout.dims
    out = factors.dense.new_zeros((factors.n, factors.dense.shape[1], projection.dim))  # the end stays 0: `fft_dims`
    starts = [sum(dims[:group]) for group in range(len(dims))]

    def share(group: int) -> Tensor:
        return out[..., starts[group] : starts[group] + dims[group]]

    def place(values: Tensor, group: int) -> None:
        if layout.exact[group]:
            share(group).copy_(values)
        else:
            count_sketch(values, *hashes(seed, 2 * group, values.shape[-1], dims[group], values.device), share(group))

    first = int(_generic(factors))  # the layers' groups follow the generic one
    if first:
        place(factors.dense, 0)
        lookups = zip(plan.lookups, factors.lookup_deltas, factors.indices, strict=True)
        for stream, (lookup, delta, rows) in enumerate(lookups, start=len(dims)):
            share(0).add_(lookup_sketch(delta, rows, lookup.rows, dims[0], seed, stream))
    pieces = zip(factors.deltas, factors.inputs, layout.directions, strict=True)
    for group, (delta, inputs, (u, v)) in zip(range(first, len(dims), 3), pieces, strict=True):
        rows, columns, across, off = _pieces(delta, inputs, u, v)
        place(rows, group)
        place(columns, group + 1)
        share(group + 2).copy_(layer_sketch(across, off, dims[group + 2], seed, group + 2))
    return out
