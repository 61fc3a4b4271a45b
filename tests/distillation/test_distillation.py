"""The distilled NTK: kip's gradient, spectra, alignment, selections, gradient-space support, and the distill CLI."""

import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ntk_explain.cli import app
from ntk_explain.distillation.kip import KIP, kip_loss
from ntk_explain.distillation.spectra import (
    centred,
    class_ranks,
    effective_rank,
    kernel_alignment,
    predictor_kernel,
    rank_at,
)
from ntk_explain.distillation.support import allocate, centred_one_hot, gradient_support, select
from ntk_explain.features.featurizer import featurizer
from ntk_explain.options import SELECTIONS, Budget, KernelSpec
from tests.models import mlp


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("cosine", [True, False])
def test_kip_loss_gradient_matches_central_differences(cosine):
    """d loss / d X_s through the per-sample gradients φ(X_s) (double backward), float64, a small MLP."""
    model = mlp()
    generator = torch.Generator().manual_seed(0)
    support = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    targets = torch.randn(9, 6, generator=generator, dtype=torch.float64)
    features = featurizer(model, KernelSpec("pseudo", "sparse", 32), support, Budget(torch.device("cpu"), 2**28))

    def feature_map(x):
        return features.featurize(x).dense.reshape(len(x), -1)

    target_features = feature_map(targets).detach()
    labels = centred_one_hot(torch.tensor([0, 1, 2, 0]), 3, torch.float64)
    outputs = torch.randn(9, 3, generator=generator, dtype=torch.float64)

    def loss(x):
        return KIP(reg=1e-3, cosine=cosine).objective(feature_map, x, labels, target_features, outputs)

    x = support.clone().requires_grad_(True)
    (analytic,) = torch.autograd.grad(loss(x), x)
    numeric = torch.zeros_like(support)
    h = 1e-6
    for index in np.ndindex(*support.shape):
        step = torch.zeros_like(support)
        step[index] = h
        numeric[index] = (loss(support + step) - loss(support - step)) / (2 * h)
    assert analytic.abs().max() > 1e-3  # the check is not vacuous
    assert torch.allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_kip_loss_is_the_kernel_ridge_error():
    support, target = _features(4, 7, 7), _features(5, 7, 8)
    labels, outputs = _features(4, 3, 9), _features(5, 3, 10)
    k_ss = support @ support.T
    system = k_ss + 0.1 * torch.trace(k_ss) / 4 * torch.eye(4, dtype=torch.float64)
    predicted = target @ support.T @ torch.linalg.inv(system) @ labels
    expected = 0.5 * ((predicted - outputs) ** 2).sum() / 5
    assert kip_loss(support, target, labels, outputs, 0.1).item() == pytest.approx(expected.item(), rel=1e-10)


def test_effective_rank_and_r_eps_against_eigvalsh():
    features, classes = _features(30, 8, 0), torch.arange(30) % 3
    features[classes == 1] *= torch.tensor([10.0, 3, 1, 0.1, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    entropy, ranks = class_ranks(features, classes, 4, (0.01, 0.05))
    for c in range(3):
        rows = features[classes == c]
        lam = torch.linalg.eigvalsh(rows @ rows.T).clamp_min(0).flip(0)
        p = lam[lam > 1e-9 * lam.sum()] / lam.sum()
        assert entropy[c].item() == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)
        for j, eps in enumerate((0.01, 0.05)):
            share = lam.cumsum(0) / lam.sum()
            assert ranks[c, j].item() == next(r + 1 for r in range(len(lam)) if share[r] >= 1 - eps)
    assert entropy[3] == 0 and ranks[3].tolist() == [0, 0]  # a class with no points
    assert entropy[1] < entropy[0]  # the stretched class is of lower effective rank


def test_flat_and_single_spectra():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert rank_at(torch.ones(7), 0.05) == 7
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert rank_at(torch.tensor([90.0, 8.0, 2.0]), 0.05) == 2 and rank_at(torch.tensor([90.0, 8.0, 2.0]), 0.01) == 3


def test_kernel_alignment_is_the_normalised_trace():
    a, b = _features(6, 4, 1), _features(6, 4, 2)
    k1, k2 = a @ a.T, b @ b.T
    expected = torch.trace(k1 @ k2) / (torch.linalg.matrix_norm(k1) * torch.linalg.matrix_norm(k2))
    assert kernel_alignment(k1, k2) == pytest.approx(expected.item(), rel=1e-12)
    assert kernel_alignment(k1, 3 * k1) == pytest.approx(1.0)
    h = torch.eye(6, dtype=torch.float64) - 1 / 6
    assert torch.allclose(centred(k1), h @ k1 @ h)
    shifted = a + 50.0  # a common offset aligns the plain kernels, not the centred ones
    assert kernel_alignment(shifted @ shifted.T, (b + 50.0) @ (b + 50.0).T) > 0.99
    assert kernel_alignment(centred(shifted @ shifted.T), centred(k1)) == pytest.approx(1.0)


@pytest.mark.parametrize(("n", "d"), [(5, 12), (20, 6)])
def test_predictor_kernel_in_either_space(n, d):
    test, support = _features(7, d, 3), _features(n, d, 4)
    gram = support @ support.T
    eps = 1e-3 * torch.trace(gram) / n
    expected = test @ support.T @ torch.linalg.solve(gram + eps * torch.eye(n, dtype=gram.dtype), support @ test.T)
    assert torch.allclose(predictor_kernel(test, support, 1e-3), expected, rtol=1e-8, atol=1e-10)


def test_allocate_splits_by_class_size():
    assert allocate([100, 50, 50, 0], 8) == [4, 2, 2, 0]
    counts = allocate([144, 150, 3, 140], 14)
    assert sum(counts) == 14 and min(counts) >= 1 and counts[2] <= 3
    assert allocate([2, 2], 10) == [2, 2]


@pytest.mark.parametrize("method", SELECTIONS)
def test_selections_take_distinct_points_of_each_class(method):
    features, classes = _features(40, 5, 5), torch.arange(40) % 4
    chosen = select(features, classes, [3, 2, 4, 1], method, seed=0)
    assert len(set(chosen.tolist())) == 10
    assert torch.bincount(classes[chosen], minlength=4).tolist() == [3, 2, 4, 1]
    assert torch.equal(chosen, select(features, classes, [3, 2, 4, 1], method, seed=0))


def test_farthest_points_cover_the_directions():
    """Unit features along ±e1, e2 and a near-copy of e1: the k-centre in cosine picks the three directions."""
    points = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    chosen = select(points, torch.zeros(4, dtype=torch.int64), [3], "farthest", seed=0)
    assert sorted(chosen.tolist()) in ([0, 2, 3], [1, 2, 3])


def test_gradient_support_lies_in_each_class_span():
    """Every synthetic feature is Φ_cᵀu for its class c: the least-squares residual on Φ_c's rows vanishes."""
    features, classes = _features(60, 20, 6), torch.arange(60) % 3
    support, support_classes = gradient_support(features, classes, [4, 4, 4], seed=0)
    assert support.shape == (12, 20) and torch.bincount(support_classes, minlength=3).sum() == 12
    for phi, c in zip(support, support_classes, strict=True):
        rows = features[classes == c]
        u = torch.linalg.lstsq(rows.T, phi[:, None]).solution
        assert torch.linalg.norm(rows.T @ u - phi[:, None]) < 1e-8 * torch.linalg.norm(phi)


# --------------------------------------------------------------------------------------------------
# The distill command


def _data(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 12)):
        np.savez(tmp_path / f"{split}.npz", x=rng.normal(size=(n, 6)), y=np.arange(n) % 3)
    return ["--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz")]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("method", ["kip", "gradient", "select"])
def test_distill_then_attribute_beside_the_full_surrogate(tmp_path, method):
    data, run = _data(tmp_path), tmp_path / "run.h5"
    model = ["--model", "tests.models:mlp", "--dtype", "float64"]
    assert _invoke("compute", *model, *data, "--kernel", "trace", "--out", run, "--quiet").exit_code == 0
    result = _invoke(
        "distill", *model, *data, "--method", method, "--per-class", 4, "--target", "labels", "--steps", 3,
        "--kernel", "trace", "--proj-dim", 64, "--out", run, "--export", tmp_path / "support.safetensors", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["m"] == 12 and summary["reduction"] == 5.0 and 0 < summary["kernel_alignment"] <= 1 + 1e-12
    assert _invoke("attribute", run, "--quiet").exit_code == 0
    assert _invoke("attribute", run, "--kernel", "distilled", "--quiet").exit_code == 0
    with h5py.File(run) as f:
        distilled, kernel = f["distill"], f["kernel/distilled"]
        assert kernel["train_train"].shape == (12, 12) and kernel["test_train"].shape == (12, 12)
        assert "kernel/trace" in f and "faithfulness" in f  # the full-data groups are kept
        # scores sum to the surrogate's logit of the explained class, on the distilled support too
        scores, cls = distilled["attribution/scores"][()], distilled["attribution/class"][()]
        logits = distilled["surrogate/logits_test"][()]
        assert np.allclose(scores.sum(1), logits[np.arange(12), cls], atol=1e-10)
        features, classes = kernel["features/train"][()].reshape(12, -1), distilled["classes"][()]
        for c in range(3):
            rows = features[classes == c]
            lam = np.clip(np.linalg.eigvalsh(rows @ rows.T), 0, None)
            p = lam[lam > 1e-12 * lam.sum()] / lam.sum()
            assert distilled["effective_rank_distilled"][c] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
        assert distilled["nearest_index"].shape == (12, 5)
        assert ("inputs" in distilled) == (method != "gradient")
        assert ("loss" in distilled) == (method == "kip")
    # the kGLM on the support's basis, fitted to the network on all 60 training points through the stored 60×12 kernel
    on_train = _invoke("attribute", run, "--kernel", "distilled", "--fit-on", "train", "--overwrite", "--json")
    assert on_train.exit_code == 0, on_train.output
    with h5py.File(run) as f:
        surrogate, kernel = f["distill/surrogate"], f["kernel/distilled"]
        assert surrogate["W"].shape == (3, 12) and surrogate["logits_train"].shape == (60, 3)
        assert surrogate.attrs["fit_on"] == "train" and surrogate.attrs["target"] == "model"
        full, diag_full, diag = kernel["full_train"][()], kernel["diag_full"][()], kernel["diag_train"][()]
        assert full.shape == (60, 12) and np.all(full**2 <= np.outer(diag_full, diag) * (1 + 1e-9))
        if method == "select":  # the support is a subset: its rows of the full block are its own kernel
            assert np.allclose(full[f["distill/source"][()]], kernel["train_train"][()], rtol=1e-10)
        scores, cls = f["distill/attribution/scores"][()], f["distill/attribution/class"][()]
        assert np.allclose(scores.sum(1), surrogate["logits_test"][()][np.arange(12), cls], atol=1e-10)
    assert _invoke("attribute", run, "--fit-on", "train", "--overwrite").exit_code == 2
    exported = load_file(tmp_path / "support.safetensors")
    assert exported["features"].shape == (12, 3, 64) and exported["labels"].shape == (12, 3)
    evaluate = json.loads(_invoke("evaluate", run, "--json").stdout)
    assert "agreement" in evaluate and evaluate["distilled"]["reduction"] == 5.0
    table = _invoke("evaluate", run)
    assert "distilled" in table.stdout and "kernel_alignment" in table.stdout
    assert "effective_rank_full" in _invoke("info", run).stdout


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--reduction", "2", "--per-class", "2"], 2, "not both"),
        (["--projection", "none"], 2, "projection"),
        (["--kernel", "full"], 2, "pseudo or trace"),
        (["--method", "nope"], 2, ""),
    ],
)
def test_distill_usage_errors(tmp_path, extra, code, message):
    data = _data(tmp_path)
    result = _invoke("distill", "--model", "tests.models:mlp", *data, "--out", tmp_path / "r.h5", *extra)
    assert result.exit_code == code and message in result.output
    assert not (tmp_path / "r.h5").exists()


def test_distill_refuses_other_data_and_a_second_support(tmp_path):
    data, run = _data(tmp_path), tmp_path / "run.h5"
    args = ["distill", "--model", "tests.models:mlp", "--method", "select", "--per-class", "2", "--out", run]
    assert _invoke(*args, *data, "--quiet").exit_code == 0
    before = run.read_bytes()
    second = _invoke(*args, *data)
    assert second.exit_code == 3 and "--overwrite" in second.output
    np.savez(tmp_path / "other.npz", x=np.ones((10, 6)), y=np.arange(10) % 3)
    other = _invoke(*args, "--train", tmp_path / "other.npz")
    assert other.exit_code == 3 and "other train data" in other.output
    torch.save(mlp().state_dict(), tmp_path / "w.pt")
    weighted = _invoke(*args, *data, "--weights", tmp_path / "w.pt", "--overwrite")
    assert weighted.exit_code == 3 and "another model or weights" in weighted.output
    assert run.read_bytes() == before
    assert _invoke(*args, *data, "--overwrite", "--seed", "1", "--quiet").exit_code == 0
    with h5py.File(run) as f:
        assert json.loads(f["distill"].attrs["params"])["distill"]["seed"] == 1 and f["distill"].attrs["command"]
