"""Dense random projections R g_k of factored tangent features, formed a block of gradient columns at a time."""

from __future__ import annotations

import torch
from torch import Tensor

from ntk_explain.features.plan import TangentPlan
from ntk_explain.features.projections import Projection
from ntk_explain.kernel.factors import Factors
from ntk_explain.options import SKETCHES


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
