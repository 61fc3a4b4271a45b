"""The exact path kernel (SPEC §5.1): the identity f_{w_S}(x) = f_{w_0}(x) + Σ_i A(x, i) + D(x) to 1e-10 of the
change on models trained for hundreds of float64 steps with every recorded optimiser, smooth and with kinks (ReLU,
max-pooling: the adaptive panels enclose them), and the contributions of a 2-step run equal to a brute-force
computation with explicit Jacobians and scipy's fixed_quad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import fixed_quad
from torch import nn
from torch.func import functional_call, jacrev

from ntk_explain.errors import BadInputError
from ntk_explain.features.projections import Projection
from ntk_explain.loading.zoo import make_mlp
from tests.models import cnn, mlp
from tests.trajectories import explain, optimizers, record

EXACT = 1e-10  # of max |f_final − f_initial|


def _data(shape: tuple[int, ...], n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=generator)
    return x, y, torch.randn((6, *shape), generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("name", list(optimizers()))
def test_identity_for_every_optimiser(tmp_path: Path, name: str) -> None:
    x, y, test = _data((6,), 32)
    model = mlp()
    path = record(tmp_path / "t.h5", model, optimizers()[name](model), x, y, 40, 8)
    explained = explain(path, model, x, y, test, nodes=8, depth=0)
    assert explained.relative_residual <= EXACT
    assert float(explained.result.step_error.max()) <= 1e-13


def test_the_test_mlp_with_plain_sgd_for_300_steps(tmp_path: Path) -> None:
    x, y, test = _data((6,), 48)
    model = mlp()
    path = record(tmp_path / "t.h5", model, torch.optim.SGD(model.parameters(), lr=0.2), x, y, 300, 8)
    explained = explain(path, model, x, y, test, nodes=6, depth=0)  # tanh is smooth: Q ≤ 8 nodes, no panels split
    assert explained.relative_residual <= EXACT
    assert explain(path, model, x, y, test, nodes=1, depth=0).relative_residual > 100 * EXACT  # quadrature matters


def test_the_batchnorm_cnn_with_momentum_and_weight_decay(tmp_path: Path) -> None:
    x, y, test = _data((1, 4, 4), 32)
    model = cnn()  # BatchNorm in eval mode (running statistics fixed), a ReLU: kinks within steps
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    path = record(tmp_path / "t.h5", model, optimizer, x, y, 200, 8)
    explained = explain(path, model, x, y, test, nodes=6)
    assert explained.relative_residual <= EXACT
    assert float(explained.result.decay.abs().max()) > 0  # the weight decay's part is kept apart
    assert bool((explained.result.panels > 200).any())  # some segments were split at kinks


def test_a_relu_mlp_with_adamw_needs_and_gets_split_panels(tmp_path: Path) -> None:
    x, y, test = _data((6,), 32)
    torch.manual_seed(0)
    model = make_mlp(6, (16, 16), 3).double()
    path = record(
        tmp_path / "t.h5", model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), x, y, 200, 8
    )
    assert explain(path, model, x, y, test, nodes=6).relative_residual <= EXACT
    assert explain(path, model, x, y, test, nodes=6, depth=0).relative_residual > 1e-8  # kinks need the panels


def test_a_window_of_steps_with_momentum_reaching_into_it(tmp_path: Path) -> None:
    x, y, test = _data((6,), 32)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    path = record(tmp_path / "t.h5", model, optimizer, x, y, 30, 8)
    explained = explain(path, model, x, y, test, depth=0, span=(10, 20))
    assert explained.relative_residual <= EXACT
    assert explained.result.step_error.shape == (6, 10)


def _flat_jacobian(model: nn.Module, names: list[str], flat: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """J_w(x) (C, P) at the flat parameters `flat`, by jacrev."""
    shapes = [p.shape for p in model.parameters()]
    sizes = [s.numel() for s in shapes]

    def f(vector: torch.Tensor) -> torch.Tensor:
        params = {n: part.reshape(s) for n, part, s in zip(names, vector.split(sizes), shapes, strict=True)}
        return functional_call(model, params, (x[None],))[0]

    return jacrev(f)(flat).numpy()


@pytest.mark.parametrize(
    ("tangents", "panels"), [(True, 1), (False, 1), (True, 3)], ids=["tangents", "jacrev", "panels"]
)
def test_two_sgd_steps_equal_a_brute_force_computation(tmp_path: Path, tangents: bool, panels: int) -> None:
    """Contributions and path kernel against explicit Jacobians integrated by scipy's fixed_quad, with Jacobians from
    the tangent engine or vmap(jacrev), on one panel or a composite rule of three."""
    x, y, test = _data((6,), 6)
    model, lr = mlp(), 0.3
    names = [n for n, _ in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    path = record(tmp_path / "t.h5", model, torch.optim.SGD(model.parameters(), lr=lr), x, y, 2, 3, seed=1)
    explained = explain(path, model, x, y, test, nodes=8, depth=0, panels=panels, tangents=tangents)
    classes = torch.arange(6) % 3
    chosen = explain(path, model, x, y, test, nodes=8, depth=0, panels=panels, tangents=tangents, classes=classes)

    batches = torch.randperm(6, generator=torch.Generator().manual_seed(1)).split(3)  # the rows `record` drew
    weights, contributions, kernel, class_kernel = [w0], np.zeros((6, 6, 3)), np.zeros((6, 6)), np.zeros((6, 6))
    for rows in batches:  # replay plain SGD: w_{s+1} = w_s − η/|B| Σ_i J(x_i)ᵀ ℓ'_i
        w = weights[-1]
        jac = {int(i): _flat_jacobian(model, names, w, x[i]) for i in rows}
        logits = {int(i): functional_call(model, _unflat(model, names, w), (x[i][None],))[0].detach() for i in rows}
        grads = {i: jac[i].T @ (torch.softmax(logits[i], 0) - nn.functional.one_hot(y[i], 3)).numpy() for i in jac}
        step = -lr / len(rows) * sum(grads.values())
        weights.append(w + torch.from_numpy(step))
        delta = weights[-1] - w
        for m in range(6):
            integral, _ = fixed_quad(
                lambda ts, m=m, w=w, delta=delta: np.stack(
                    [_flat_jacobian(model, names, w + t * delta, test[m]) for t in ts], axis=-1
                ),
                0.0,
                1.0,
                n=20,
            )  # ∫₀¹ J_{w_s(t)}(x_m) dt (C, P)
            for i in jac:
                contributions[m, i] += -lr / len(rows) * integral @ grads[i]
                kernel[m, i] += lr / len(rows) * np.trace(integral @ jac[i].T)
                class_kernel[m, i] += lr / len(rows) * integral[classes[m]] @ jac[i][classes[m]]
    assert np.abs(explained.result.contributions.numpy() - contributions).max() <= 1e-12
    assert np.abs(explained.result.kernel.numpy() - kernel).max() <= 1e-12
    picked = contributions[np.arange(6), :, classes.numpy()]
    assert np.abs(chosen.result.contributions.numpy() - picked).max() <= 1e-12
    assert np.abs(chosen.result.kernel.numpy() - class_kernel).max() <= 1e-12
    assert np.abs(contributions).max() > 1e-3  # the comparison is not of zeros


def _unflat(model: nn.Module, names: list[str], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    shapes = [p.shape for p in model.parameters()]
    parts = flat.split([s.numel() for s in shapes])
    return {n: part.reshape(s) for n, part, s in zip(names, parts, shapes, strict=True)}


def test_a_float32_training_read_in_float64_is_exact_to_float32(tmp_path: Path) -> None:
    x, y, test = _data((6,), 32)
    model = mlp().float()
    path = record(tmp_path / "t.h5", model, torch.optim.SGD(model.parameters(), lr=0.1), x.float(), y, 20, 8)
    explained = explain(path, model.double(), x, y, test, depth=0)  # steps were float32 arithmetic
    assert 1e-12 < explained.relative_residual < 1e-4


def test_the_explained_class_alone_and_every_class_agree(tmp_path: Path) -> None:
    """Contributions of one class per point (the default of path-kernel) are those of every class at that class; the
    class kernels sum to the trace kernel; the class sums Σ_i A, taken by JVPs along the updates' gradient parts, are
    the every-class contributions summed over the training points."""
    x, y, test = _data((6,), 12)
    model = mlp()
    path = record(tmp_path / "t.h5", model, optimizers()["momentum"](model), x, y, 8, 4)
    every = explain(path, model, x, y, test, depth=0)
    classes = torch.arange(len(test)) % 3
    chosen = explain(path, model, x, y, test, depth=0, classes=classes)
    picked = every.result.contributions[torch.arange(len(test)), :, classes]
    assert torch.allclose(chosen.result.contributions, picked, rtol=0, atol=1e-14)
    assert picked.abs().max() > 1e-3
    summed = every.result.contributions.sum(1)
    for result in (every.result, chosen.result):
        assert torch.allclose(result.change, summed, rtol=0, atol=1e-13)
        assert torch.equal(result.decay, every.result.decay)
    each = [explain(path, model, x, y, test, depth=0, classes=torch.full((len(test),), c)).result for c in range(3)]
    assert torch.allclose(sum(r.kernel for r in each), every.result.kernel, rtol=0, atol=1e-13)
    assert not torch.allclose(each[0].kernel, every.result.kernel, atol=1e-3)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_projected_contributions_are_unbiased(tmp_path: Path, name: str) -> None:
    """--projection sparse: the mean over seeds of the CountSketched contributions and kernel tends to the exact ones
    (within 4.5 standard errors everywhere), each seed's alone is off, and more rows make it closer; with momentum and
    with Adam's elementwise preconditioner (applied before the projection)."""
    x, y, test = _data((6,), 16)
    model = mlp()
    path = record(tmp_path / "t.h5", model, optimizers()[name](model), x, y, 8, 4)
    classes = torch.arange(len(test)) % 3
    exact = explain(path, model, x, y, test, depth=0, classes=classes).result
    seeds = [
        explain(path, model, x, y, test, depth=0, classes=classes, projection=Projection("sparse", 24, seed))
        for seed in range(48)
    ]
    for field in ("contributions", "kernel"):
        values = torch.stack([getattr(s.result, field) for s in seeds])
        mean, error = values.mean(0), values.std(0) / len(seeds) ** 0.5
        truth = getattr(exact, field)
        assert bool(((mean - truth).abs() <= 4.5 * error + 1e-12).all()), field
        assert float((values[0] - truth).abs().max()) > 1e-3 * float(truth.abs().max())
    wide = explain(path, model, x, y, test, depth=0, classes=classes, projection=Projection("sparse", 1024, 0)).result
    narrow = (seeds[0].result.contributions - exact.contributions).abs().mean()
    assert (wide.contributions - exact.contributions).abs().mean() < narrow / 2
    assert torch.equal(seeds[0].result.change, exact.change)  # the class sums stay exact


def test_a_projection_refuses_param_groups_of_other_momenta(tmp_path: Path) -> None:
    """R commutes with the recursion only when μ, a and b are one value each: other groups' momenta are refused."""
    x, y, test = _data((6,), 8)
    model = mlp()
    first, *rest = model.parameters()
    groups = [{"params": [first], "momentum": 0.9}, {"params": rest, "momentum": 0.5}]
    path = record(tmp_path / "t.h5", model, torch.optim.SGD(groups, lr=0.05), x, y, 4, 4)
    assert explain(path, model, x, y, test, depth=0).relative_residual <= EXACT  # exact, it is followed
    with pytest.raises(BadInputError, match="one momentum"):
        explain(path, model, x, y, test, depth=0, projection=Projection("sparse", 16, 0))
