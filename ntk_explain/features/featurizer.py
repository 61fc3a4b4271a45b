"""The features of a kernel for batches of inputs: exact factors, projected or sketched features, or the conjugate
kernel's penultimate activations, with the memory they take."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ntk_explain.errors import UsageError
from ntk_explain.features.plan import TangentPlan
from ntk_explain.features.planning import plan_tangents
from ntk_explain.features.projected import project
from ntk_explain.features.projections import Projection
from ntk_explain.features.sketches import sketch, sketch_layout
from ntk_explain.features.tangents import penultimate, tangent_factors
from ntk_explain.kernel.factors import Factors
from ntk_explain.kernel.grams import contraction, kernel_output
from ntk_explain.loading.adapter import Batch, ModelAdapter, as_adapter
from ntk_explain.options import SKETCHES, Budget, KernelSpec

SKETCH_PROBE = 64  # the first training rows, which set a sketch's layout (directions, shares of d)


@dataclass(frozen=True)
class Featurizer:
    """Features of a kernel for a batch of inputs, with its memory estimates in bytes."""

    featurize: Callable[[Tensor | Batch], Factors]
    classes: int  # size of each class axis of the kernel (1 for pseudo and ck)
    dtype: torch.dtype  # of the features, hence of the kernel
    work_bytes: int  # per sample, while featurising
    kept_bytes: int  # per sample, of the features kept
    pair_bytes: int  # per (row, column) pair of a Gram block
    attrs: dict


def featurizer(model: nn.Module | ModelAdapter, spec: KernelSpec, probe: Tensor | Batch, budget: Budget) -> Featurizer:
    """The featurizer of `spec` for inputs like `probe` (a few samples, on the budget's device): its first two
    samples plan the tangents and prove the plan (`plan_tangents`); for a sketch, all of it sets the layout: the
    layers' directions and the groups' shares of d (`sketch_layout`)."""
    adapter, probe = as_adapter(model), Batch.of(probe)
    if spec.kernel == "ck":
        return _conjugate(adapter, probe)
    plan = plan_tangents(adapter, probe, kernel_output(spec.kernel), spec.params, max_check_bytes=budget.bytes // 4)
    itemsize, k = plan.dtype.itemsize, plan.outputs
    entries = {"trace": 1, "diagonal": k, "full": k * k}[contraction(spec.kernel)]  # per (row, column) pair
    dense = sum(plan.params[n].numel() for n in plan.dense)
    kept = k * dense + sum(layer.sites * (k * layer.out_features + layer.in_features + 1) for layer in plan.layers)
    kept += sum(lookup.sites * (k * lookup.features + 1) for lookup in plan.lookups)
    sites = max((s.sites for s in (*plan.layers, *plan.lookups)), default=1)
    formed = sum(layer.sites * (k * layer.out_features + layer.in_features) for layer in plan.formed)  # δ and a
    formed += sum(lookup.sites * k * lookup.features for lookup in plan.formed_lookups)
    work = 2 * (k + 1) * plan.activation_numel + 2 * kept + formed
    attrs = {
        "n_params": plan.n_params,
        "outputs": k,
        "factorised": [layer.module for layer in plan.layers] or [""],
        "formed": [layer.module for layer in plan.formed] or [""],
        "tangent_path": plan.path,
        "generic": json.dumps(_by_reason(plan.generic)),
        **{f"check_{key}": value for key, value in plan.check.items()},
    }
    if not spec.projected:
        return Featurizer(
            featurize=lambda x: tangent_factors(adapter, plan, x),
            classes=k,
            dtype=plan.dtype,
            work_bytes=itemsize * work,
            kept_bytes=itemsize * kept,
            pair_bytes=itemsize * 3 * entries * sites * sites,
            attrs=attrs,
        )
    features = _projected(adapter, plan, spec, probe, budget, attrs)
    return Featurizer(
        featurize=lambda x: Factors(features(plan, tangent_factors(adapter, plan, x)), (), ()),
        classes=k,
        dtype=plan.dtype,
        work_bytes=itemsize * (work + k * spec.proj_dim),
        kept_bytes=itemsize * k * spec.proj_dim,
        pair_bytes=itemsize * 3 * entries,
        attrs=attrs,
    )


def _conjugate(adapter: ModelAdapter, probe: Batch) -> Featurizer:
    """The conjugate kernel's features: the penultimate activations φ(x) as one output."""
    phi = penultimate(adapter, probe[:1])
    width, itemsize = phi.shape[-1], phi.element_size()
    return Featurizer(
        featurize=lambda x: Factors(penultimate(adapter, x)[:, None, :], (), ()),
        classes=1,
        dtype=phi.dtype,
        work_bytes=4 * itemsize * width,
        kept_bytes=itemsize * width,
        pair_bytes=3 * itemsize,
        attrs={},
    )


def _projected(
    adapter: ModelAdapter, plan: TangentPlan, spec: KernelSpec, probe: Batch, budget: Budget, attrs: dict
) -> Callable[[TangentPlan, Factors], Tensor]:
    """How the tangent factors become projected features: a sketch, with its layout from the probe (recorded in
    `attrs`), or a dense projection in blocks of the budget."""
    projection = Projection(spec.projection, spec.proj_dim, spec.seed)
    if spec.projection not in SKETCHES:
        block = max(1, budget.bytes // (8 * plan.dtype.itemsize))
        return functools.partial(project, projection=projection, block_numel=block)
    groups = bool(plan.dense or plan.lookups) + 3 * len(plan.layers)  # `SketchLayout.groups`
    if spec.proj_dim < groups:
        raise UsageError(
            f"--proj-dim {spec.proj_dim} is too small for a {spec.projection} of this model: its {groups} groups "
            "(the other parameters, then each layer's rows, columns and rest) need a dimension each"
        )
    with torch.no_grad():
        layout = sketch_layout(tangent_factors(adapter, plan, probe), spec.proj_dim, spec.projection)
    attrs.update(
        sketch_groups=layout.groups, sketch_dims=layout.dims, sketch_exact=layout.exact, sketch_probe=len(probe)
    )
    return functools.partial(sketch, projection=projection, layout=layout)


def _by_reason(generic: dict[str, str]) -> dict[str, list[str]]:
    """The generic parameters grouped by the reason they are not structured."""
    grouped: dict[str, list[str]] = {}
    for name, reason in generic.items():
        grouped.setdefault(reason, []).append(name)
    return grouped
