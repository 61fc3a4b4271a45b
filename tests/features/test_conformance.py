"""Conformance on the architectures users bring (`tests.architectures`): every exact kernel, through the CLI, against
the float64 jacrev reference; projected kernels run and stay unbiased; attribute runs; the plan's self-check catches a
wrong formula."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ntk_explain.cli import app
from ntk_explain.features import modules
from ntk_explain.features.featurizer import featurizer
from ntk_explain.features.planning import plan_tangents
from ntk_explain.features.tangents import tangent_factors
from ntk_explain.kernel.grams import gram
from ntk_explain.loading.adapter import Batch
from ntk_explain.loading.models import load_model
from ntk_explain.options import Budget, KernelSpec
from tests import reference
from tests.architectures import ARCHITECTURES, reference_jacobian
from tests.models import MODELS
from tests.reference import rel

TOL = 1e-8
N_TRAIN, N_TEST = 7, 4
KERNELS = ("trace", "pseudo", "full")
BLOCKS = ("train_train", "test_train", "diag_train", "diag_test")


def _write(path: Path, batch: torch.Tensor | dict, classes: int, seed: int) -> None:
    arrays = {"x": batch} if isinstance(batch, torch.Tensor) else batch
    n = len(next(iter(arrays.values())))
    labels = np.random.default_rng(seed).integers(0, classes, n)
    np.savez(path, **{name: a.numpy() for name, a in arrays.items()}, y=labels)


def _invoke(*args: str) -> None:
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output


def _exact(j_rows: torch.Tensor, j_cols: torch.Tensor, kind: str, block: str) -> np.ndarray:
    if block.startswith("diag"):
        return reference.self_kernel(j_rows, kind).numpy()
    return reference.kernel(j_rows, j_cols, kind).numpy()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_exact_kernels_of_real_architectures(tmp_path, name, request):
    """trace, pseudo and full exact kernels (every block) < 1e-8 against float64 jacrev; exit 0; attribute runs; the
    kernel group says which parameters are generic and which path ran."""
    arch = ARCHITECTURES[name]
    train, test = arch.inputs(N_TRAIN, 0), arch.inputs(N_TEST, 1)
    _write(tmp_path / "train.npz", train, arch.classes, 0)
    _write(tmp_path / "test.npz", test, arch.classes, 1)
    keyword = not isinstance(train, torch.Tensor)
    keys = ["--x-key", ",".join(train)] if keyword else []
    model = ["--model", f"hf:{request.getfixturevalue('hf_directory')}"] if name == "hf_bert" else []
    model = model or ["--model", f"tests.architectures:{name}"]
    run = str(tmp_path / "run.h5")
    common = [*model, "--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"), *keys]
    tiles = ["--tile", "3", "--batch-size", "2"]  # several tiles, each in passes of two rows
    _invoke("compute", *common, "--kernel", ",".join(KERNELS), "--dtype", "float64", *tiles, "--out", run)
    net = arch.factory()  # hf_bert: the weights saved in hf_directory
    j_train, j_test = reference_jacobian(net, train), reference_jacobian(net, test)
    with h5py.File(run) as f:
        for kind in KERNELS:
            group = f[f"kernel/{kind}"]
            for block in BLOCKS:
                rows = j_train if block in ("train_train", "diag_train") else j_test
                assert rel(group[block][()], _exact(rows, j_train, kind, block)) < TOL, (kind, block)
            assert group.attrs["tangent_path"] in ("batched", "vmap", "loop")
            assert group.attrs["check_error"] < 1e-6 and group.attrs["check_dtype"] == "float64"
            generic = json.loads(group.attrs["generic"])
            assert all(reason for reason in generic)
    _invoke("attribute", run)
    with h5py.File(run) as f:
        assert f["attribution/scores"].shape == (N_TEST, N_TRAIN)
        assert 0.0 <= f["faithfulness"].attrs["agreement"] <= 1.0
    for kind in ("sparse", "tensorsketch"):
        out = str(tmp_path / f"{kind}.h5")
        _invoke("compute", *common, "--kernel", "trace", "--projection", kind, "--proj-dim", "64", "--out", out)
        with h5py.File(out) as f:
            assert np.isfinite(f[f"kernel/trace-{kind}-64/train_train"][()]).all()


@pytest.mark.parametrize("kind", ["sparse", "tensorsketch"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_projected_kernels_of_real_architectures_are_unbiased(name, kind):
    """The mean of 24 seeds' projected trace kernels is much closer to the exact one than one seed's (~1/√24)."""
    arch = ARCHITECTURES[name]
    net = arch.factory()
    x = arch.inputs(N_TRAIN, 0)
    jac = reference_jacobian(net, x)
    exact = reference.kernel(jac, jac, "trace").numpy()
    budget = Budget(torch.device("cpu"), 2**30)
    runs = []
    for seed in range(24):
        features = featurizer(net, KernelSpec("trace", kind, 32, seed), Batch.of(x), budget).featurize(x).dense
        flat = features.reshape(N_TRAIN, -1)
        runs.append((flat @ flat.T).numpy())
    single = np.mean([rel(run, exact) for run in runs])
    assert rel(np.mean(runs, axis=0), exact) <= 0.6 * single + 1e-12


@pytest.mark.parametrize(
    ("name", "target", "formula"),
    [("mlp", "1", "site_inputs"), ("cnn", "0", "weight_gradient"), ("normed", "norm", "normalised")],
    ids=["factorised", "formed", "affine"],
)
def test_a_wrong_formula_is_caught_and_computed_generically(tmp_path, monkeypatch, name, target, formula):
    """A layer's formula made wrong (its site inputs, its formed gradient, its x̂ scaled by 1.01) fails the plan's
    self-check: the layer goes to the generic path, and the kernel is exact."""
    factory, _, _ = MODELS[name]
    model = factory()
    wrong_module = dict(model.named_modules())[target]
    real = getattr(modules, formula)

    def wrong(module, *args):
        value = real(module, *args)
        return value * 1.01 if module is wrong_module else value

    monkeypatch.setattr(modules, formula, wrong)
    x = torch.randn(6, *MODELS[name][1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = plan_tangents(model, x)
    demoted = {n: r for n, r in plan.generic.items() if n.startswith(f"{target}.")}
    assert demoted and all(r.startswith("failed the self-check") for r in demoted.values())
    assert target not in [s.module for s in plan.structured]
    features = featurizer(model, KernelSpec("full"), x, Budget(torch.device("cpu"), 2**30)).featurize(x)
    jac = reference.jacobian(model, x)
    assert rel(gram(features, features, "full"), reference.kernel(jac, jac, "full")) < TOL


def _plan(name: str, output: str = "logits"):
    arch = ARCHITECTURES[name]
    return plan_tangents(arch.factory(), Batch.of(arch.inputs(2, 0)), output)


def test_plan_records_why_parameters_are_generic():
    """A parameter goes generic, with the reason, when it is used outside its module's forward, when its module's
    class overrides the formula's forward, or when a call has no batch axis; a model that vmap cannot run takes the
    per-sample loop; PyTorch's own modules stay structured around them."""
    tied = _plan("tied_decoder")
    assert tied.generic["enc.weight"].startswith("also used outside enc's forward") and tied.path == "vmap"
    assert [layer.module for layer in tied.layers] == ["head"]
    head = _plan("tied_embedding_head")
    assert head.generic["emb.weight"].startswith("also used outside emb's forward")
    std = _plan("std_conv")
    assert std.generic["0.weight"] == "StdConv2d overrides Conv2d.forward" and [a.module for a in std.affines] == ["1"]
    assert _plan("depthwise").generic["norm1.weight"] == "LayerNorm2d overrides LayerNorm.forward"
    block = _plan("transformer_block")
    assert block.generic == {"pos.weight": "a call without a batch axis (output (6, 8))"}
    assert {"q", "k", "v", "out"} <= {layer.module for layer in (*block.layers, *block.formed)}
    attention = _plan("transformer_torch")
    assert attention.generic["encoder.layers.0.self_attn.in_proj_weight"] == "no structured form (MultiheadAttention)"
    gru = _plan("gru")
    assert gru.path == "loop" and gru.generic["gru.weight_ih_l0"] == "no structured form (GRU)"
    depthwise = _plan("depthwise")
    assert [layer.module for layer in depthwise.formed] == ["depthwise", "pointwise"]  # grouped: formed
    conv1d = _plan("conv1d")
    assert conv1d.path == "batched" and [layer.module for layer in conv1d.formed] == ["0", "3"] and not conv1d.generic


@pytest.mark.parametrize("output", ["logits", "pseudo"])
def test_broadcast_positions_are_lookups(output):
    """Position embeddings of a (1, L) buffer are broadcast over the batch: each sample gets its own δ, as a lookup
    (16 rows) and a formed lookup (3 rows), on the batched path."""
    factory, shape, _ = MODELS["positions"]
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = plan_tangents(factory(), x, output)
    assert [(e.module, e.broadcast) for e in plan.lookups] == [("pos", (True,))]
    assert [(e.module, e.broadcast) for e in plan.formed_lookups] == [("offset", (True,))]
    assert plan.path == "batched" and plan.jacobian == ()


def test_hugging_face_bert_runs_batched(hf_directory):
    """A Hugging Face BERT (2-D attention mask, whose masking code cannot run under vmap) has no Jacobian parameter:
    its position embeddings (batch axis 1) and small tables are formed lookups, so it runs on the batched path."""

    loaded = load_model(f"hf:{hf_directory}")
    plan = plan_tangents(loaded.module.double(), Batch.of(ARCHITECTURES["hf_bert"].inputs(2, 0)))
    assert plan.path == "batched" and plan.jacobian == ()
    assert "bert.embeddings.position_embeddings" in [e.module for e in plan.formed_lookups]


def test_weight_norm_and_an_output_hook_stay_exact():
    """A Linear under the old `weight_norm` (its weight made from g and v by a forward pre-hook: g and v are generic)
    and a Linear whose output a user's forward hook doubles (its formula no longer holds: the self-check demotes it)
    both give exact kernels."""
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        normed = torch.nn.utils.weight_norm(torch.nn.Linear(4, 5))
    hooked = torch.nn.Linear(4, 5)
    hooked.register_forward_hook(lambda _module, _args, out: 2 * out)
    x = torch.randn(6, 4, dtype=torch.float64)
    for first, reason in ((normed, "not 0's weight or bias"), (hooked, "failed the self-check")):
        model = torch.nn.Sequential(first, torch.nn.Tanh(), torch.nn.Linear(5, 3)).double().eval()
        plan = plan_tangents(model, x)
        assert all(r.startswith(reason) for r in plan.generic.values()) and plan.generic
        features = featurizer(model, KernelSpec("full"), x, Budget(torch.device("cpu"), 2**30)).featurize(x)
        jac = reference.jacobian(model, x)
        assert rel(gram(features, features, "full"), reference.kernel(jac, jac, "full")) < TOL


@pytest.mark.parametrize("name", ["mlp", "cnn", "normed", "positions"])
def test_every_path_gives_the_same_features_and_input_gradients(name):
    """The batched pass, vmap(jacrev) and the per-sample loop give the same kernel, and the same gradient of it with
    respect to the inputs (kip differentiates the features through any of them)."""
    factory, shape, _ = MODELS[name]
    model = factory()
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = plan_tangents(model, x, "pseudo")
    jac = reference.jacobian(model, x)
    exact = reference.kernel(jac, jac, "pseudo")
    gradients = []
    for path in ("batched", "vmap", "loop"):
        inputs = x.clone().requires_grad_()
        factors = tangent_factors(model, dataclasses.replace(plan, path=path), inputs)
        kernel = gram(factors, factors, "trace")
        assert rel(kernel.detach(), exact) < TOL, path
        gradients.append(torch.autograd.grad(kernel.sum(), inputs)[0])
    assert rel(gradients[1], gradients[0]) < TOL and rel(gradients[2], gradients[0]) < TOL


def test_conv1d_is_factorised_or_formed():
    """A Conv1d is structured as a Conv2d of height 1: formed with many positions, factorised with one."""
    factory, shape, _ = MODELS["conv1d"]
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = plan_tangents(factory(), x)
    assert [layer.module for layer in plan.formed] == ["0"] and [layer.module for layer in plan.layers] == ["3", "5"]
    assert plan.path == "batched" and plan.jacobian == ()
