"""Empirical NTK variants as Grams of tangent features, computed tile by tile.

For samples x (rows) and x' (columns), with g_k the tangent features of `gradients`:

| kernel   | value                                   | block shape  |
|----------|-----------------------------------------|--------------|
| full     | Θ_cc'(x,x') = ⟨g_c(x), g_c'(x')⟩         | (n, m, C, C) |
| diagonal | K_c(x,x') = ⟨g_c(x), g_c(x')⟩            | (n, m, C)    |
| trace    | Σ_c ⟨g_c(x), g_c(x')⟩                    | (n, m)       |
| pseudo   | (1/C)⟨Σ_c g_c(x), Σ_c g_c(x')⟩            | (n, m)       |
| ck       | ⟨φ(x), φ(x')⟩, φ the penultimate layer   | (n, m)       |

Pseudo is the trace contraction of the K = 1 output Σ_c f_c/√C; ck is the trace contraction of
φ as a K = 1 feature. A factorised layer contributes Σ_{s,t} ⟨δ_ks, δ'_k't⟩⟨ã_s, ã'_t⟩, a lookup (embedding,
ã_s = e_{i_s}) Σ_{s,t} [i_s = i'_t] ⟨δ_ks, δ'_k't⟩; affine (normalisation) parameters are dense columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ntk_explain.gradients import Factors, TangentPlan
from ntk_explain.projections import (
    SKETCHES,
    Projection,
    count_sketch,
    hashes,
    kronecker_sketch,
    lookup_sketch,
    sketch_shares,
    tensor_sketch,
)

KERNELS = ("full", "diagonal", "trace", "pseudo", "ck")
_CLASS_AXES = {"trace": "", "diagonal": "k", "full": "kl"}


def contraction(kernel: str) -> str:
    """How the K output axes are combined: 'full', 'diagonal' or 'trace'."""
    return kernel if kernel in ("full", "diagonal") else "trace"


def output_map(kernel: str) -> str:
    """The output map of `gradients`: the scaled logit sum for pseudo, the logits otherwise."""
    return "pseudo" if kernel == "pseudo" else "logits"


def _indices(how: str, pairwise: bool) -> tuple[str, str, str]:
    """Einsum letters: the right sample, the right class, and the output axes."""
    right = "m" if pairwise else "n"
    return right, "l" if how == "full" else "k", ("nm" if pairwise else "n") + _CLASS_AXES[how]


def feature_gram(a: Tensor, b: Tensor | None, how: str) -> Tensor:
    """Inner products of features a (n, K, X) with b (m, K, X) → (n, m, …); b None: self (n, …). The trace Gram of
    a with itself (b is a) is `symmetric_gram` of a (n, K·X)."""
    if b is a and how == "trace":
        return symmetric_gram(a.flatten(1))
    right, right_class, out = _indices(how, b is not None)
    return torch.einsum(f"nkx,{right}{right_class}x->{out}", a, a if b is None else b)


def symmetric_gram(x: Tensor, leaf: int = 256) -> Tensor:
    """x xᵀ (n, n) for x (n, X): halves recursively down to `leaf` rows, computing the diagonal blocks and one
    off-diagonal block of each split and mirroring the other (5/8 of one product's flops at n = 4·leaf)."""
    n = x.shape[0]
    if n <= leaf:
        return x @ x.T
    half = n // 2
    out = x.new_empty((n, n))
    out[:half, :half] = symmetric_gram(x[:half], leaf)
    out[half:, half:] = symmetric_gram(x[half:], leaf)
    out[:half, half:] = x[:half] @ x[half:].T
    out[half:, :half] = out[:half, half:].T
    return out


def _site_gram(delta_a: Tensor, delta_b: Tensor | None, sites: Tensor, how: str) -> Tensor:
    """Σ_{s,t} ⟨δ_ks(x), δ_k't(x')⟩ A_st for δ (n, K, S, O), (m, K, T, O) and the sites' Gram A (n, m, S, T);
    b None: self, A (n, S, S)."""
    pairwise = delta_b is not None
    right, right_class, out = _indices(how, pairwise)
    rows = "nm" if pairwise else "n"
    deltas = torch.einsum(f"nkso,{right}{right_class}to->{out}st", delta_a, delta_b if pairwise else delta_a)
    return torch.einsum(f"{out}st,{rows}st->{out}", deltas, sites)


def factor_gram(delta_a: Tensor, in_a: Tensor, delta_b: Tensor | None, in_b: Tensor | None, how: str) -> Tensor:
    """Σ_{s,t} ⟨δ_ks(x), δ_k't(x')⟩ ⟨ã_s(x), ã_t(x')⟩ for δ (n, K, S, O), ã (n, S, I); b None: self."""
    if delta_b is None:
        return _site_gram(delta_a, None, torch.einsum("nsi,nti->nst", in_a, in_a), how)
    return _site_gram(delta_a, delta_b, torch.einsum("nsi,mti->nmst", in_a, in_b), how)


def lookup_gram(delta_a: Tensor, rows_a: Tensor, delta_b: Tensor | None, rows_b: Tensor | None, how: str) -> Tensor:
    """Σ_{s,t} [i_s(x) = i_t(x')] ⟨δ_ks(x), δ_k't(x')⟩ for δ (n, K, S, d) and rows i (n, S): the factor Gram of
    ã_s = e_{i_s} without one-hot vectors; b None: self."""
    if delta_b is None:
        return _site_gram(delta_a, None, (rows_a[:, :, None] == rows_a[:, None, :]).to(delta_a.dtype), how)
    same = rows_a[:, None, :, None] == rows_b[None, :, None, :]
    return _site_gram(delta_a, delta_b, same.to(delta_a.dtype), how)


def _structured(factors: Factors) -> list[tuple[Callable[..., Tensor], Tensor, Tensor]]:
    """(Gram function, δ, site inputs) of every factorised layer, then of every lookup."""
    layers = [(factor_gram, d, a) for d, a in zip(factors.deltas, factors.inputs, strict=True)]
    return layers + [(lookup_gram, d, i) for d, i in zip(factors.lookup_deltas, factors.indices, strict=True)]


def gram(a: Factors, b: Factors | None, how: str) -> Tensor:
    """Kernel block between the samples of `a` and `b` (b None: each sample with itself)."""
    total = feature_gram(a.dense, None if b is None else b.dense, how)
    others = [(None, None)] * len(a.deltas + a.lookup_deltas) if b is None else [s[1:] for s in _structured(b)]
    for (function, delta, sites), other in zip(_structured(a), others, strict=True):
        total = total + function(delta, sites, *other, how)
    return total


def project(plan: TangentPlan, factors: Factors, projection: Projection, block_numel: int) -> Tensor:
    """Projected features R g_k (n, K, d) of `factors`, R's columns in θ order (`plan.params`).

    Gradients are projected a block of columns at a time (a factorised layer forms Σ_s δ_s ã_sᵀ a
    block of output rows at a time; a lookup forms only the rows i_s its samples touch, a block of them
    at a time, and projects each run of consecutive rows by R's columns of those rows), so no more than
    about `block_numel` gradient entries and as many entries of R exist at once.
    """
    if projection.kind in SKETCHES:
        raise ValueError(f"{projection.kind} is a sketch: see `sketch`")
    n, k = factors.n, plan.outputs
    out = factors.dense.new_zeros((n, k, projection.dim))
    offsets = plan.offsets()
    step = max(1, block_numel // max(n * k, projection.dim))  # bounds both the gradient and the R block
    column = 0
    for name in plan.dense:
        size = plan.params[name].numel()
        for start in range(0, size, step):
            stop = min(size, start + step)
            projection.add_projection(out, factors.dense[:, :, column + start : column + stop], offsets[name] + start)
        column += size
    for layer, delta, inputs in zip(plan.layers, factors.deltas, factors.inputs, strict=True):
        width = inputs.shape[-1]
        rows = max(1, step // width)
        for r0 in range(0, layer.out_features, rows):
            r1 = min(layer.out_features, r0 + rows)
            grads = torch.einsum("nkso,nsi->nkoi", delta[..., r0:r1], inputs)
            if layer.weight:
                weight = grads[..., : layer.in_features].reshape(n, k, -1)
                projection.add_projection(out, weight, offsets[layer.weight] + r0 * layer.in_features)
            if layer.bias:
                projection.add_projection(out, grads[..., -1], offsets[layer.bias] + r0)
    for lookup, delta, indices in zip(plan.lookups, factors.lookup_deltas, factors.indices, strict=True):
        touched, position = torch.unique(indices, return_inverse=True)
        rows = max(1, step // lookup.features)
        for u0 in range(0, len(touched), rows):
            block = touched[u0 : u0 + rows].tolist()
            grads = _lookup_rows(delta, position - u0, len(block))
            for j0, j1 in _runs(block):
                start = offsets[lookup.weight] + block[j0] * lookup.features
                projection.add_projection(out, grads[:, :, j0:j1].reshape(n, k, -1), start)
    return out


def _lookup_rows(delta: Tensor, position: Tensor, count: int) -> Tensor:
    """Rows G_j = Σ_{s: p_s = j} δ_s, j < count, of a lookup's gradient (n, K, count, d), from δ (n, K, S, d) and
    each site's row position p (n, S); sites with p outside [0, count) are left out."""
    n, k, _, d = delta.shape
    keep = (position >= 0) & (position < count)
    target = (torch.arange(n, device=delta.device)[:, None] * count + position)[keep]
    rows = delta.new_zeros((n * count, k, d)).index_add_(0, target, delta.transpose(1, 2)[keep])
    return rows.reshape(n, count, k, d).transpose(1, 2)


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Spans [j0, j1) of consecutive integers in an increasing list."""
    starts = [0, *(j for j in range(1, len(values)) if values[j] != values[j - 1] + 1)]
    return list(zip(starts, [*starts[1:], len(values)], strict=True))


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


def mirror(block: Tensor) -> Tensor:
    """The block of (x', x) from that of (x, x'): swap the sample axes and the class axes."""
    return block.permute(1, 0, *reversed(range(2, block.dim())))


@dataclass
class Tiles:
    """A set of n samples seen in row tiles, their features kept in memory when `keep`."""

    featurize: Callable[[int, int], Factors]
    n: int
    tile: int
    keep: bool

    def __post_init__(self) -> None:
        self._kept: dict[int, Factors] = {}

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return [(s, min(self.n, s + self.tile)) for s in range(0, self.n, self.tile)]

    def get(self, start: int, stop: int) -> Factors:
        if start in self._kept:
            return self._kept[start]
        factors = self.featurize(start, stop)
        if self.keep:
            self._kept[start] = factors
        return factors


def kernel_blocks(
    rows: Tiles, cols: Tiles | None, how: str, stripes: Callable[[int], bool] | None = None
) -> Iterator[tuple[slice, slice, Tensor]]:
    """Blocks (row slice, column slice, block) of the rows × cols Gram, stripe by stripe: the blocks of one row tile.

    cols None: the symmetric rows × rows Gram, each off-diagonal block computed once and mirrored (the stripe of row
    tile r is its blocks from the diagonal on and their mirrors). `stripes(i)` says whether the stripe of the i-th
    row tile is wanted (default: all).
    """
    for index, (r0, r1) in enumerate(rows.bounds):
        if stripes is not None and not stripes(index):
            continue
        a = rows.get(r0, r1)
        for c0, c1 in (cols or rows).bounds:
            if cols is None and c0 < r0:
                continue
            block = gram(a, a if cols is None and c0 == r0 else (cols or rows).get(c0, c1), how)
            yield slice(r0, r1), slice(c0, c1), block
            if cols is None and c0 != r0:
                yield slice(c0, c1), slice(r0, r1), mirror(block)


def self_kernel(tiles: Tiles, how: str, stripes: Callable[[int], bool] | None = None) -> Iterator[tuple[slice, Tensor]]:
    """K(x, x) of the samples of every (wanted: `stripes(i)`) tile: (n,), (n, C) or (n, C, C)."""
    for index, (start, stop) in enumerate(tiles.bounds):
        if stripes is None or stripes(index):
            yield slice(start, stop), gram(tiles.get(start, stop), None, how)
