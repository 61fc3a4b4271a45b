"""Jacobians formed from tangent features, and their weighted sum over weight states (the path kernel's quadrature),
of all outputs or of each sample's class, against the float64 jacrev reference on the architectures users bring and
the test models."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from ntk_explain.features.jacobian import jacobian, summed_jacobian
from ntk_explain.features.planning import plan_tangents
from ntk_explain.features.tangents import tangent_factors
from ntk_explain.loading.adapter import Batch
from tests.architectures import ARCHITECTURES, reference_jacobian
from tests.models import MODELS, data
from tests.reference import rel

TOL = 1e-10


def _moved(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of the model with every parameter moved by 5% noise (its buffers as they are)."""
    moved = copy.deepcopy(net)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype) * (p.abs().mean() + 0.1))
    return moved


def _models() -> dict[str, tuple[torch.nn.Module, Batch]]:
    made = {name: (arch.factory(), arch.inputs(5, 1)) for name, arch in ARCHITECTURES.items()}
    for name, (factory, _, _) in MODELS.items():
        made[f"models.{name}"] = (factory(), data(name, 5, 1))
    return made


@pytest.mark.parametrize("name", sorted(_models()))
def test_weighted_sum_of_states_is_the_weighted_sum_of_jacobians(name):
    """Σ_q ω_q J_{w_q}(x) from the tangent features of three weight states (the model's and two moved copies, every
    state passed as plan params) equals the same sum of jacrev Jacobians, and one state's Jacobian alone is J."""
    net, x = _models()[name]
    batch = Batch.of(x)
    plan = plan_tangents(net, batch)
    states = [net, _moved(net, 1), _moved(net, 2)]
    weights = [0.2, 0.5, 0.3]
    parts = []
    for state in states:
        named = dict(state.named_parameters())
        parts.append(tangent_factors(net, replace(plan, params={n: named[n].detach() for n in plan.params}), batch))
    expected = sum(w * reference_jacobian(s, x) for w, s in zip(weights, states, strict=True))
    assert rel(summed_jacobian(plan, parts, weights), expected) <= TOL
    assert rel(jacobian(plan, parts[0]), reference_jacobian(net, x)) <= TOL


@pytest.mark.parametrize("name", sorted(_models()))
def test_the_jacobian_of_each_samples_class_with_every_layer_factorised(name):
    """The path kernel's test side: a plan with every ungrouped Linear and conv factorised, and cotangents picking
    one class per sample (one-hot rows), give that class's row of the jacrev Jacobian."""
    net, x = _models()[name]
    batch = Batch.of(x)
    plan = plan_tangents(net, batch, factorise=True)
    expected = reference_jacobian(net, x)  # (n, C, P)
    classes = torch.arange(len(batch)) % expected.shape[1]
    cotangents = torch.nn.functional.one_hot(classes, expected.shape[1]).to(expected)[:, None, :]
    picked = expected[torch.arange(len(batch)), classes][:, None]
    assert rel(jacobian(plan, tangent_factors(net, plan, batch, cotangents)), picked) <= TOL
    assert rel(jacobian(plan, tangent_factors(net, plan, batch)), expected) <= TOL
