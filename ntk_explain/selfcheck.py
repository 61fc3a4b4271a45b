"""The plan's self-check: every parameter's per-sample gradient from the tangent features against plain autograd.

With random output weights c (n, K), the features give G_θ(x_i) = Σ_k c_ik ∂o_k(x_i)/∂θ of every parameter θ
(`contracted_gradients`: dense columns, Σ_s (c·δ_s) ã_sᵀ of a factorised layer, the rows Σ_{s: i_s = j} c·δ_s of a
lookup), and one backward pass of Σ_k c_ik o_k(x_i) per row gives the same by autograd (`reference_gradients`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ntk_explain.adapter import Batch, ModelAdapter
from ntk_explain.gradients import Factors, TangentPlan, output_map


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


def contracted_gradients(plan: TangentPlan, factors: Factors, weights: Tensor) -> dict[str, Tensor]:
    """Σ_k c_ik g_k(x_i) of every selected parameter (n, numel) from the tangent features and weights c (n, K)."""
    n = factors.n
    grads, start = {}, 0
    dense = torch.einsum("nk,nkp->np", weights, factors.dense)
    for name in plan.dense:
        size = plan.params[name].numel()
        grads[name], start = dense[:, start : start + size], start + size
    for layer, delta, inputs in zip(plan.layers, factors.deltas, factors.inputs, strict=True):
        gradient = torch.einsum("nk,nkso,nsi->noi", weights, delta, inputs)
        if layer.weight:
            grads[layer.weight] = gradient[..., : layer.in_features].reshape(n, -1)
        if layer.bias:
            grads[layer.bias] = gradient[..., -1]
    for lookup, delta, rows in zip(plan.lookups, factors.lookup_deltas, factors.indices, strict=True):
        per_site = torch.einsum("nk,nksd->nsd", weights, delta)
        table = per_site.new_zeros((n, lookup.rows, lookup.features))
        table.scatter_add_(1, rows.long()[..., None].expand_as(per_site), per_site)
        grads[lookup.weight] = table.reshape(n, -1)
    return grads


def reference_gradients(adapter: ModelAdapter, plan: TangentPlan, rows: Batch, weights: Tensor) -> dict[str, Tensor]:
    """Σ_k c_ik ∂o_k(x_i)/∂θ of every selected parameter (n, numel) by one autograd backward pass per row."""
    per_row = []
    for i in range(len(rows)):
        with torch.enable_grad():
            params = {name: p.detach().requires_grad_() for name, p in plan.params.items()}
            logits = adapter.functional({**plan.fixed, **params}, rows[i : i + 1])
            total = (output_map(logits[0], plan.output) * weights[i]).sum()
            grads = torch.autograd.grad(total, list(params.values()), allow_unused=True, materialize_grads=True)
        per_row.append([g.reshape(-1) for g in grads])
    return {name: torch.stack([row[j] for row in per_row]) for j, name in enumerate(plan.params)}


def gradient_errors(fast: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """‖fast − reference‖ / ‖reference‖ per parameter, the norm floored at 1e-8 of the whole gradient's (a parameter
    with no gradient on these rows is compared to the rest's scale)."""
    total = float(torch.sqrt(sum(r.double().square().sum() for r in reference.values())))
    floor = max(1e-8 * total, torch.finfo(torch.float64).tiny)
    return {
        name: float(torch.linalg.vector_norm((fast[name] - ref).double()))
        / max(float(torch.linalg.vector_norm(ref.double())), floor)
        for name, ref in reference.items()
    }
