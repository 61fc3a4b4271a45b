"""The plan's self-check: every parameter's per-sample gradient from the tangent features against plain autograd.

With random output weights c (n, K), the features give G_θ(x_i) = Σ_k c_ik ∂o_k(x_i)/∂θ of every parameter θ (dense
columns, Σ_s (c·δ_s) ã_sᵀ of a factorised layer, the rows Σ_{s: i_s = j} c·δ_s of a lookup), and one backward pass of
Σ_k c_ik o_k(x_i) per row gives the same by autograd; `gradient_errors` compares them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ntk_explain.features.plan import TangentPlan, output_map
from ntk_explain.kernel.factors import Factors
from ntk_explain.loading.adapter import Batch, ModelAdapter


def in_dtype(plan: TangentPlan, rows: Batch, dtype: torch.dtype) -> tuple[TangentPlan, Batch]:
    """The plan and the rows with every floating parameter, buffer and input in `dtype`."""

    def cast(t: Tensor) -> Tensor:
        return t.detach().to(dtype) if t.is_floating_point() else t.detach()

    params = {name: cast(p) for name, p in plan.params.items()}
    fixed = {name: cast(t) for name, t in plan.fixed.items()}
    return replace(plan, params=params, fixed=fixed, dtype=dtype), rows.to(dtype=dtype)


def output_weights(n: int, k: int, like: Tensor) -> Tensor:
    """The random weights c (n, K) of the check, the same on every run."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, k, generator=generator, dtype=torch.float64).to(dtype=like.dtype, device=like.device)


def _squared_distance(
    fast: tuple[Tensor, Tensor], gram: Tensor, reference: Tensor, square: Tensor, rows: Tensor | None
) -> Tensor:
    """‖F − R‖² for F = Σ_s u_s v_sᵀ given by (U (S, o), V (S, i)) and R (o, i), without forming F when in float64:
    ‖F‖² − 2 Σ_s u_sᵀ R v_s + ‖R‖² (‖F‖² from `gram`, Σ_{s,t} (u_s·u_t)(v_s·v_t); ‖R‖² is `square`). `rows` (S,): a
    lookup's, whose v_s are one-hot, so R v_s is the row R[i_s]. In lower precision F is formed (the expansion would
    cancel)."""
    u, v = fast
    if reference.dtype != torch.float64:
        formed = u.T @ v if rows is None else u.new_zeros(reference.shape).index_add_(0, rows, u)
        return torch.dist(formed, reference).square()
    along = v @ reference.T if rows is None else reference[rows]  # (S, o): R v_s
    return (gram - 2 * (u * along).sum() + square).clamp_min(0)


def gradient_errors(
    adapter: ModelAdapter, plan: TangentPlan, rows: Batch, factors: Factors, weights: Tensor
) -> dict[str, float]:
    """‖fast − reference‖ / ‖reference‖ per parameter over the rows: fast, Σ_k c_ik g_k(x_i) from the tangent features
    (dense columns as they are; a factorised layer's Σ_s u_s ã_sᵀ and a lookup's rows Σ_{s: i_s = j} u_s, u_s = Σ_k
    c_ik δ_ks, never formed in float64); reference, by one autograd backward pass of Σ_k c_ik o_k(x_i) per row. The norm
    is floored at 1e-8 of the whole gradient's (a parameter with no gradient on these rows is compared to the rest's
    scale)."""
    names = list(plan.params)
    dense = torch.einsum("nk,nkp->np", weights, factors.dense)
    offsets, start = {}, 0
    for name in plan.dense:
        offsets[name], start = slice(start, start + plan.params[name].numel()), start + plan.params[name].numel()
    squares = []  # per row: ‖fast − reference‖² and ‖reference‖² of every parameter, in `names` order
    for i in range(len(rows)):
        with torch.enable_grad():
            params = {name: p.detach().requires_grad_() for name, p in plan.params.items()}
            logits = adapter.functional({**plan.fixed, **params}, rows[i : i + 1])
            total = (output_map(logits[0], plan.output) * weights[i]).sum()
            grads = torch.autograd.grad(total, list(params.values()), allow_unused=True, materialize_grads=True)
        reference = dict(zip(names, grads, strict=True))
        squares_ref = {name: torch.linalg.vector_norm(g).square() for name, g in reference.items()}
        distance = {
            name: torch.dist(dense[i, where], reference[name].reshape(-1)).square() for name, where in offsets.items()
        }
        for layer, delta, inputs in zip(plan.layers, factors.deltas, factors.inputs, strict=True):
            u, v = weights[i] @ delta[i].flatten(1), inputs[i]  # (S, o), (S, i')
            u = u.reshape(delta.shape[2], -1)
            if layer.weight:
                a = v[:, : layer.in_features]
                gram = ((u @ u.T) * (a @ a.T)).sum()
                ref = reference[layer.weight].reshape(layer.out_features, -1)
                distance[layer.weight] = _squared_distance((u, a), gram, ref, squares_ref[layer.weight], None)
            if layer.bias:
                distance[layer.bias] = torch.dist(u.sum(0), reference[layer.bias]).square()
        for lookup, delta, indices in zip(plan.lookups, factors.lookup_deltas, factors.indices, strict=True):
            u, at = (weights[i] @ delta[i].flatten(1)).reshape(delta.shape[2], -1), indices[i].long()
            gram = ((u @ u.T) * (at[:, None] == at[None, :])).sum()
            ref = reference[lookup.weight]
            distance[lookup.weight] = _squared_distance((u, u), gram, ref, squares_ref[lookup.weight], at)
        squares.append(torch.stack([distance[n] for n in names] + [squares_ref[n] for n in names]))
    sums = torch.stack(squares).double().sum(0).sqrt().tolist()
    differences, norms = sums[: len(names)], sums[len(names) :]
    floor = max(1e-8 * math.sqrt(sum(v * v for v in norms)), torch.finfo(torch.float64).tiny)
    return {name: d / max(r, floor) for name, d, r in zip(names, differences, norms, strict=True)}
