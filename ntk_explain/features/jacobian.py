"""Per-sample Jacobians formed from tangent features, alone or summed over weight states.

J(x) (n, K, P) over the plan's parameters (`plan.params` order, each flattened): the dense columns as they are, a
factorised layer's weight block Σ_s δ_s a_sᵀ and bias Σ_s δ_s, a lookup's rows Σ_{s: i_s = j} δ_s. Tangent features
are linear in their sites, so Σ_q ω_q J_{w_q}(x) over weight states w_q (the path kernel's quadrature) is formed by
adding each state's terms, scaled by ω_q, in place: a factorised layer's block by one batched product per state and
output (`baddbmm`), without joining the states' sites.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ntk_explain.features.plan import TangentPlan
from ntk_explain.features.tangents import lookup_columns
from ntk_explain.kernel.factors import Factors


def _added(target: Tensor, values: Tensor, weight: float, first: bool) -> None:
    """target += ω values in place; the first state's sets it (the output is not zeroed first)."""
    if first:
        torch.mul(values, weight, out=target)
    else:
        target.add_(values, alpha=weight)


def summed_jacobian(plan: TangentPlan, parts: Iterable[Factors], weights: Sequence[float | Tensor]) -> Tensor:
    """Σ_q ω_q J_q (n, K, P) from the factors of each state q (the same samples and plan, taken one at a time, so a
    caller may compute each state's factors as it goes), in `plan.params` order. A factorised layer's weight blocks
    accumulate in a contiguous (K, n, d_out, d_in) buffer (batched products on it run at twice the speed of ones on
    the strided blocks of the output) and are copied into place once."""
    offsets, out = plan.offsets(), None
    dense, start = [], 0
    for name in plan.dense:
        size = plan.params[name].numel()
        dense.append((offsets[name], start, size))
        start += size
    blocks: dict[int, Tensor] = {}  # layer index → Σ_q ω_q Σ_s δ_qs a_qsᵀ (K, n, d_out, d_in)
    for factors, weight in zip(parts, weights, strict=True):
        weight, first = float(weight), out is None
        n, k = factors.n, factors.dense.shape[1]  # K of the plan's output map, or of the cotangents used
        if first:  # every coordinate is written below: the dense columns, the layers' blocks and biases, the lookups
            out = factors.dense.new_empty((n, k, plan.n_params))
        for at, begin, size in dense:
            _added(out[:, :, at : at + size], factors.dense[:, :, begin : begin + size], weight, first)
        for index, (layer, delta, inputs) in enumerate(zip(plan.layers, factors.deltas, factors.inputs, strict=True)):
            if layer.weight:  # δ (n, K, S, d_out), ã (n, S, d_in')
                if first:
                    blocks[index] = delta.new_empty((k, n, layer.out_features, layer.in_features))
                sites = inputs[..., : layer.in_features]
                for output in range(k):
                    product = delta[:, output].transpose(1, 2)
                    blocks[index][output].baddbmm_(product, sites, beta=0.0 if first else 1.0, alpha=weight)
            if layer.bias:
                at = offsets[layer.bias]
                _added(out[:, :, at : at + layer.out_features], delta.sum(2), weight, first)
        for lookup, delta, rows in zip(plan.lookups, factors.lookup_deltas, factors.indices, strict=True):
            at = offsets[lookup.weight]
            columns = lookup_columns(lookup, delta, rows)
            _added(out[:, :, at : at + lookup.rows * lookup.features], columns, weight, first)
    if out is None:
        raise ValueError("summed_jacobian needs at least one state")
    for index, block in blocks.items():
        layer = plan.layers[index]
        at, size = offsets[layer.weight], layer.out_features * layer.in_features
        out[:, :, at : at + size] = block.flatten(2).transpose(0, 1)
    return out


def jacobian(plan: TangentPlan, factors: Factors) -> Tensor:
    """J (n, K, P) of the plan's parameters, in `plan.params` order, each flattened as `Tensor.reshape(-1)` does."""
    return summed_jacobian(plan, [factors], [1.0])
