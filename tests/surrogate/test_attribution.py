"""Surrogates, attribution and the attribute stage: exact sums, stored logits, the fit against scikit-learn."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from sklearn.linear_model import SGDClassifier
from typer.testing import CliRunner

from ntk_explain.cli import app
from ntk_explain.kernel.read import read_kernel
from ntk_explain.surrogate.attribution import all_class_scores, attribution_scores, extremes
from ntk_explain.surrogate.estimators import FeatureKernel, KernelGLM, KernelRidge, class_weights, glm_objective


def cosine_kernel(n: int, m: int, classes: int = 3, seed: int = 0):
    """A cosine-normalised kernel of random features, with labels from a random linear rule."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n + m, 12, generator=g, dtype=torch.float64)
    labels = (features[:, :classes] + 0.3 * torch.randn(n + m, classes, generator=g, dtype=torch.float64)).argmax(1)
    unit = features / features.norm(dim=1, keepdim=True)
    kernel = unit @ unit[:n].T
    return kernel[:n], kernel[n:], labels[:n], labels[n:]


def test_attributions_sum_to_the_surrogate_logits():
    train, test, y, _ = cosine_kernel(40, 9)
    glm = KernelGLM(alpha=1e-3).fit(train, y, 3)
    logits = glm.decision_function(test)
    every = all_class_scores(test, glm.W_, glm.b_)
    np.testing.assert_allclose(every.sum(1), logits, rtol=0, atol=1e-10)
    chosen = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1])
    one = attribution_scores(test, glm.W_, glm.b_, chosen)
    np.testing.assert_allclose(one.sum(1), logits[torch.arange(9), chosen], rtol=0, atol=1e-10)
    np.testing.assert_array_equal(one, every[torch.arange(9), :, chosen])


def test_extremes_are_the_largest_and_smallest_scores():
    scores = torch.tensor([[0.25, -2.0, 3.0, 0.5], [1.0, 2.0, -1.0, 0.0]])
    top, top_scores, bottom, bottom_scores = extremes(scores, 2)
    assert top.tolist() == [[2, 3], [1, 0]] and top_scores.tolist() == [[3.0, 0.5], [2.0, 1.0]]
    assert bottom.tolist() == [[1, 0], [2, 3]] and bottom_scores.tolist() == [[-2.0, 0.25], [-1.0, 0.0]]


def test_kglm_is_deterministic_and_converges():
    train, _, y, _ = cosine_kernel(60, 1, seed=2)
    one, two = KernelGLM(alpha=1e-3).fit(train, y, 3), KernelGLM(alpha=1e-3).fit(train, y, 3)
    assert one.converged_ and one.n_iter_ > 0
    assert torch.equal(one.W_, two.W_) and torch.equal(one.b_, two.b_)
    assert torch.equal(one.predict(train), one.decision_function(train).argmax(1))
    np.testing.assert_allclose(one.predict_proba(train).sum(1), 1.0)
    assert (one.predict(train) == y).double().mean() > 0.9
    # the gradient of the objective vanishes at the solution
    W, b = one.W_.clone().requires_grad_(), one.b_.clone().requires_grad_()
    glm_objective(train, y, class_weights(y, 3, False), W, b, 1e-3).backward()
    assert W.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5


@pytest.mark.parametrize("balanced", [False, True])
def test_kglm_loss_is_at_most_sgdclassifiers(balanced):
    """Engel et al. fit scikit-learn's SGDClassifier(log_loss, l2) on kernel rows; our L-BFGS fit of the same
    regularised multinomial objective must be at least as good (scikit-learn's α·½‖w‖² is our α‖W‖²)."""
    train, _, y, _ = cosine_kernel(80, 1, seed=3)
    alpha = 1e-3
    ours = KernelGLM(alpha=alpha, balanced=balanced).fit(train, y, 3)
    sgd = SGDClassifier(
        loss="log_loss",
        penalty="l2",
        alpha=2 * alpha,
        class_weight="balanced" if balanced else None,
        random_state=0,
        max_iter=1000,
        tol=1e-6,
    ).fit(train.numpy(), y.numpy())
    weights = class_weights(y, 3, balanced)
    theirs = glm_objective(train, y, weights, torch.from_numpy(sgd.coef_), torch.from_numpy(sgd.intercept_), alpha)
    assert ours.loss_ <= theirs.item()
    assert ours.loss_ == pytest.approx(glm_objective(train, y, weights, ours.W_, ours.b_, alpha).item())


def test_class_weights_are_balanced():
    y = torch.tensor([0, 0, 0, 1])
    assert class_weights(y, 3, True).tolist() == [4 / 6, 4 / 6, 4 / 6, 2.0]
    assert class_weights(y, 3, False).tolist() == [1.0] * 4


def test_ridge_solves_its_normal_equations():
    train, test, _, _ = cosine_kernel(30, 5, seed=4)
    logits = torch.randn(30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ridge = KernelRidge(alpha=1e-2).fit(train, logits)
    expected = np.linalg.solve(train.numpy() + 1e-2 * 30 * np.eye(30), (logits - logits.mean(0)).numpy())
    np.testing.assert_allclose(ridge.W_.T, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ridge.decision_function(test), test.numpy() @ expected + logits.mean(0).numpy())


def _run_file(tmp_path, dtype: str, kernel: tuple[str, ...] = ("--kernel", "trace,full")) -> str:
    """A run file of the test MLP on 24 train and 7 test points, computed through the CLI."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 7)):
        np.savez(tmp_path / f"{split}.npz", x=rng.normal(size=(n, 6)), y=rng.integers(0, 3, n))
    out = str(tmp_path / f"run-{dtype}.h5")
    data = ["--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz")]
    args = ["compute", "--model", "tests.models:mlp", *data, *kernel, "--dtype", dtype, "--out", out, "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-6), ("float64", 1e-10)])
def test_attribute_stage_writes_exact_scores(tmp_path, dtype, tolerance):
    run = _run_file(tmp_path, dtype)
    result = CliRunner().invoke(app, ["attribute", run, "--alpha", "1e-3", "--top-k", "4", "--all-classes", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    with h5py.File(run) as f:
        scores, cls = f["attribution/scores"][()], f["attribution/class"][()]
        logits, W, b = f["surrogate/logits_test"][()], f["surrogate/W"][()], f["surrogate/b"][()]
        nn_logits = f["data/test/nn_logits"][()]
        every = f["attribution/scores_all"][()]
        top, top_scores = f["attribution/topk_index"][()], f["attribution/topk_score"][()]
        assert f["attribution"].attrs["orientation"] == "(test, train)"
        assert f["surrogate"].attrs["converged"]
    assert scores.shape == (7, 24) and every.shape == (7, 24, 3)
    np.testing.assert_array_equal(cls, nn_logits.argmax(1))
    np.testing.assert_allclose(scores.sum(1), logits[np.arange(7), cls], rtol=0, atol=tolerance)
    np.testing.assert_allclose(every.sum(1), logits, rtol=0, atol=tolerance)
    kernel = read_kernel(run, "trace", "test_train", normalize=True)
    np.testing.assert_allclose(kernel @ W.T + b, logits, rtol=0, atol=tolerance)
    np.testing.assert_array_equal(np.take_along_axis(scores, top, 1), top_scores)
    assert (np.diff(top_scores, axis=1) <= 0).all()
    assert summary["faithfulness"]["n"] == 7 and summary["kernel"] == "trace"


def test_attribute_refuses_a_second_run_without_overwrite(tmp_path):
    run = _run_file(tmp_path, "float32")
    assert CliRunner().invoke(app, ["attribute", run, "--quiet"]).exit_code == 0
    before = Path(run).read_bytes()
    second = CliRunner().invoke(app, ["attribute", run, "--kernel", "trace", "--quiet"])
    assert second.exit_code == 3 and "--overwrite" in second.stderr
    assert Path(run).read_bytes() == before
    third = CliRunner().invoke(app, ["attribute", run, "--surrogate", "ridge", "--overwrite", "--json"])
    assert third.exit_code == 0 and json.loads(third.stdout)["surrogate"]["kind"] == "ridge"
    evaluate = CliRunner().invoke(app, ["evaluate", run, "--json"])
    assert evaluate.exit_code == 0 and json.loads(evaluate.stdout)["kernel"] == "trace"


@pytest.mark.parametrize(
    ("args", "code"), [(["--kernel", "full"], 2), (["--kernel", "nope"], 3), (["--alpha", "-1"], 2)]
)
def test_attribute_bad_options(tmp_path, args, code):
    run = _run_file(tmp_path, "float32")
    result = CliRunner().invoke(app, ["attribute", run, *args])
    assert result.exit_code == code
    with h5py.File(run) as f:
        assert "surrogate" not in f and "attribution" not in f


def test_evaluate_without_a_surrogate_is_bad_input(tmp_path):
    run = _run_file(tmp_path, "float32")
    result = CliRunner().invoke(app, ["evaluate", run])
    assert result.exit_code == 3 and "faithfulness" in result.stderr


def test_demo_end_to_end(tmp_path):
    """The README's demo: train, save safetensors weights, compute, attribute, then the path-kernel section (a recorded
    SGD training explained exactly beside its kGLM); one JSON summary with --json."""
    out = tmp_path / "demo" / "demo.h5"
    args = ["demo", "--out", str(out), "--epochs", "3", "--kernel", "trace", "--path-points", "2", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    exact = summary["path"]["path_kernel"]
    assert exact["n_explained"] == 2 and exact["steps"] == "0:46" and -1 <= exact["mean_kendall_tau"] <= 1
    with h5py.File(tmp_path / "demo" / "demo-path.h5") as f:
        assert f["path/contributions"].shape == (2, 1438) and f["attribution/scores"].shape == (2, 1438)
    assert summary["test_accuracy"] > 0.8 and (tmp_path / "demo" / "demo.safetensors").is_file()
    assert 0 < summary["attribution"]["faithfulness"]["agreement"] <= 1
    with h5py.File(out) as f:
        assert f["kernel/trace/train_train"].shape == (1438, 1438)
        assert f["attribution/scores"].shape == (359, 1438)
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--epochs", "1"])
    assert again.exit_code == 3 and "--overwrite" in again.stderr


@pytest.mark.parametrize("normalize", ["scale", "none"])
def test_attribute_kernel_normalisations(tmp_path, normalize):
    run = _run_file(tmp_path, "float64")
    result = CliRunner().invoke(app, ["attribute", run, "--normalize", normalize, "--alpha", "1e-3", "--quiet"])
    assert result.exit_code == 0, result.output
    raw = read_kernel(run, "trace", "test_train")
    with h5py.File(run) as f:
        scale = f["kernel/trace/diag_train"][()].mean() if normalize == "scale" else 1.0
        W, b, logits = f["surrogate/W"][()], f["surrogate/b"][()], f["surrogate/logits_test"][()]
        assert f["surrogate"].attrs["normalize"] == normalize
    np.testing.assert_allclose(raw / scale @ W.T + b, logits, rtol=0, atol=1e-10)


def test_feature_kernel_fits_equal_dense_fits():
    """K = ΦΦᵀ as an operator gives the same kGLM and ridge as the formed kernel."""

    g = torch.Generator().manual_seed(5)
    phi = torch.randn(50, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=g)
    dense, operator = phi @ phi.T, FeatureKernel(phi)
    a, b = KernelGLM(alpha=1e-2).fit(dense, y, 3), KernelGLM(alpha=1e-2).fit(operator, y, 3)
    np.testing.assert_allclose(a.decision_function(dense), b.decision_function(operator), atol=1e-6)
    logits = torch.randn(50, 3, generator=g, dtype=torch.float64)
    r1, r2 = KernelRidge(1e-2).fit(dense, logits), KernelRidge(1e-2).fit(operator, logits)
    np.testing.assert_allclose(r1.W_, r2.W_, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("normalize", ["cosine", "scale"])
def test_projected_kernels_fit_from_their_features(tmp_path, normalize):
    """A projected kernel is fitted from its stored features; the result matches a fit on the stored Gram."""
    run = _run_file(tmp_path, "float64", ("--kernel", "pseudo", "--projection", "gaussian", "--proj-dim", "64"))
    result = CliRunner().invoke(app, ["attribute", run, "--normalize", normalize, "--alpha", "1e-2", "--quiet"])
    assert result.exit_code == 0, result.output
    gram = read_kernel(run, "pseudo-gaussian-64", "train_train", normalize=normalize == "cosine")
    with h5py.File(run) as f:
        labels = torch.from_numpy(f["data/train/nn_logits"][()].argmax(1))
        if normalize == "scale":
            gram = gram / f["kernel/pseudo-gaussian-64/diag_train"][()].mean()
        stored = f["surrogate/logits_train"][()]
    dense = KernelGLM(alpha=1e-2).fit(torch.from_numpy(gram), labels, 3)
    np.testing.assert_allclose(stored, dense.decision_function(torch.from_numpy(gram)), atol=1e-5)


def test_attribute_over_budget_is_exit_4_naming_the_option(tmp_path):
    run = _run_file(tmp_path, "float32")
    before = Path(run).read_bytes()
    result = CliRunner().invoke(app, ["attribute", run, "--max-memory", "1KB"])
    assert result.exit_code == 4 and "--max-memory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert Path(run).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
