"""`ntk-explain train` and `ntk-explain path-kernel` as real processes (SPEC §5.1, §7): the recorded training
explained exactly, into a new run or beside the kGLM's explanation (rank agreement), bad trajectories refused with
exit 3 and nothing written, a killed path kernel or training resumed to the numbers of an uninterrupted one, and two
gloo ranks under torchrun writing the file of one process."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.stats import kendalltau

from ntk_explain.store import partial_path
from tests.processes import run_cli
from tests.stages.test_distributed import _run
from tests.stages.test_resume import _calls, _driven

MODEL = ["--model", "tests.models:mlp", "--dtype", "float64"]
TRAIN = ["train", *MODEL, "--train", "data.npz", "--optimizer", "sgd", "--lr", "0.2", "--momentum", "0.5"]
TRAIN += ["--weight-decay", "1e-3", "--epochs", "6", "--batch-size", "8", "--out", "w.safetensors"]
TRAIN += ["--trajectory", "t.h5"]
PATH = ["path-kernel", *MODEL, "--weights", "w.safetensors", "--train", "data.npz", "--test", "test.npz"]
PATH += ["--trajectory", "t.h5", "--nodes", "6", "--tile", "2", "--json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    np.savez(cwd / "data.npz", x=rng.normal(size=(24, 6)), y=rng.integers(0, 3, 24))
    np.savez(cwd / "test.npz", x=rng.normal(size=(6, 6)), y=rng.integers(0, 3, 6))
    done = run_cli([*TRAIN, "--json"], cwd)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 18
    return cwd


def _copy(trained: Path, cwd: Path) -> Path:
    shutil.copytree(trained, cwd)
    return cwd


def _path(run: Path) -> dict[str, np.ndarray]:
    with h5py.File(run) as f:
        return {name: ds[()] for name, ds in f["path"].items()}


def test_train_is_deterministic(trained: Path, tmp_path: Path) -> None:
    exists = run_cli(TRAIN, _copy(trained, tmp_path / "again"))
    assert exists.returncode == 3 and "w.safetensors exists" in exists.stderr
    cwd = tmp_path / "fresh"
    cwd.mkdir()
    shutil.copy(trained / "data.npz", cwd)
    assert run_cli(TRAIN, cwd).returncode == 0
    assert (cwd / "w.safetensors").read_bytes() == (trained / "w.safetensors").read_bytes()
    with h5py.File(cwd / "t.h5") as a, h5py.File(trained / "t.h5") as b:
        assert all(np.array_equal(a["weights"][n][()], b["weights"][n][()]) for n in a["weights"])


def test_path_kernel_into_a_new_run(trained: Path, tmp_path: Path) -> None:
    cwd = _copy(trained, tmp_path / "new")
    done = run_cli([*PATH, "--out", "run.h5"], cwd)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["relative_residual"] <= 1e-10 and summary["steps"] == "0:18"
    path = _path(cwd / "run.h5")
    assert path["contributions"].shape == (6, 24) and path["kernel"].shape == (6, 24)
    assert path["step_residual"].shape == (18,) and path["step_residual"].max() < 1e-12
    with h5py.File(cwd / "run.h5") as f:
        assert np.abs(path["f_final"] - f["data/test/nn_logits"][()]).max() < 1e-12  # the model at --weights
        assert f["path"].attrs["optimizer"] == "sgd"
    change = path["f_final"] - path["f_initial"]
    rows = np.arange(6)
    assert np.abs(path["residual"]).max() <= 1e-10 * np.abs(change).max()
    assert np.allclose(path["contributions"].sum(1) + path["decay"][rows, path["class"]], change[rows, path["class"]])
    assert np.array_equal(path["topk_index"][:, 0], path["contributions"].argmax(1))


def test_path_kernel_beside_the_kglm_explanation(trained: Path, tmp_path: Path) -> None:
    cwd = _copy(trained, tmp_path / "beside")
    inputs = [*MODEL, "--weights", "w.safetensors", "--train", "data.npz", "--test", "test.npz"]
    assert run_cli(["compute", *inputs, "--out", "run.h5"], cwd).returncode == 0
    assert run_cli(["attribute", "run.h5"], cwd).returncode == 0
    done = run_cli([*PATH, "--run", "run.h5", "--all-classes"], cwd)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    path = _path(cwd / "run.h5")
    with h5py.File(cwd / "run.h5") as f:
        scores, classes = f["attribution/scores"][()], f["attribution/class"][()]
    assert path["contributions"].shape == (6, 24, 3)
    exact = path["contributions"][np.arange(6), :, classes]
    taus = [kendalltau(a, b).statistic for a, b in zip(exact, scores, strict=True)]
    assert np.allclose(path["kendall_tau"], taus)
    assert summary["mean_kendall_tau"] == pytest.approx(np.mean(taus))
    assert 0 <= summary["mean_top10_overlap"] <= 1
    shown = run_cli(["evaluate", "run.h5", "--json"], cwd)
    assert json.loads(shown.stdout)["path"]["mean_kendall_tau"] == pytest.approx(np.mean(taus))
    assert "mean_kendall_tau" in run_cli(["evaluate", "run.h5"], cwd).stdout
    fewer = run_cli([*PATH, "--run", "run.h5", "--n-test", "4", "--overwrite"], cwd)
    assert fewer.returncode == 3 and "another model or data" in fewer.stderr
    again = run_cli([*PATH, "--run", "run.h5"], cwd)
    assert again.returncode == 3 and "already has /path" in again.stderr


def _bad(cwd: Path, args: list[str], message: str) -> None:
    done = run_cli(args, cwd)
    assert done.returncode == 3, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (cwd / "run.h5").exists() and not partial_path(cwd / "run.h5").exists()


def test_bad_trajectories_are_refused(trained: Path, tmp_path: Path) -> None:
    cwd = _copy(trained, tmp_path / "bad")
    other = ["--model", "zoo:mlp", "--model-kwargs", '{"in_features": 6, "hidden": [4], "n_classes": 3}']
    assert (
        run_cli(
            ["train", *other, "--train", "data.npz", "--out", "o.safetensors", "--trajectory", "o.h5"], cwd
        ).returncode
        == 0
    )
    _bad(cwd, [*PATH, "--out", "run.h5", "--trajectory", "o.h5"], "a trajectory of another model")
    _bad(cwd, [*PATH, "--out", "run.h5", "--n-train", "10"], "batch rows out of range")
    _bad(cwd, [*PATH, "--out", "run.h5", "--weights", "o.safetensors"], "weights o.safetensors: missing keys")
    shutil.copy(cwd / "t.h5", cwd / "cut.h5")
    with h5py.File(cwd / "cut.h5", "r+") as f:
        f["steps/lr"].resize(17, axis=0)
    _bad(cwd, [*PATH, "--out", "run.h5", "--trajectory", "cut.h5"], "steps are missing")
    with h5py.File(cwd / "start.h5", "w"):
        pass
    _bad(cwd, [*PATH, "--out", "run.h5", "--trajectory", "start.h5"], "not an ntk-explain trajectory")
    moved = run_cli(
        ["train", *MODEL, "--train", "data.npz", "--lr", "0.01", "--out", "w2.safetensors", "--trajectory", "t2.h5"],
        cwd,
    )
    assert moved.returncode == 0
    _bad(cwd, [*PATH, "--out", "run.h5", "--weights", "w2.safetensors"], "final weights differ")


@pytest.mark.parametrize("into", [False, True], ids=["new-run", "existing-run"])
def test_a_killed_path_kernel_resumes_to_the_same_numbers(trained: Path, tmp_path: Path, into: bool) -> None:
    target = ["--run", "run.h5"] if into else ["--out", "run.h5"]

    def prepared(cwd: Path) -> Path:
        if into:
            inputs = [*MODEL, "--weights", "w.safetensors", "--train", "data.npz", "--test", "test.npz"]
            assert run_cli(["compute", *inputs, "--out", "run.h5"], cwd).returncode == 0
        return cwd

    reference = prepared(_copy(trained, tmp_path / "reference"))
    code, stderr = _driven(reference, [*PATH, *target], 0, "SIGKILL")
    assert code == 0, stderr
    whole, calls = _path(reference / "run.h5"), _calls(stderr)
    for at in (calls // 3, 2 * calls // 3):
        cwd = prepared(_copy(trained, tmp_path / f"killed-{at}"))
        assert _driven(cwd, [*PATH, *target], at, "SIGKILL")[0] == -signal.SIGKILL
        assert partial_path(cwd / "run.h5").exists() and (cwd / "run.h5").exists() == into
        code, stderr = _driven(cwd, [*PATH, *target, "--resume"], 0, "SIGKILL")
        assert code == 0, stderr
        resumed = _path(cwd / "run.h5")
        assert all(np.array_equal(resumed[name], whole[name]) for name in whole)


def test_a_killed_training_resumes_to_the_same_trajectory(trained: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "train"
    cwd.mkdir()
    shutil.copy(trained / "data.npz", cwd)
    assert _driven(cwd, TRAIN, 40, "SIGKILL")[0] == -signal.SIGKILL
    assert partial_path(cwd / "t.h5").exists() and not (cwd / "t.h5").exists()
    code, stderr = _driven(cwd, [*TRAIN, "--resume"], 0, "SIGKILL")
    assert code == 0, stderr
    assert (cwd / "w.safetensors").read_bytes() == (trained / "w.safetensors").read_bytes()
    with h5py.File(cwd / "t.h5") as a, h5py.File(trained / "t.h5") as b:
        assert all(np.array_equal(a["weights"][n][()], b["weights"][n][()]) for n in a["weights"])


def _datasets(run: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}

    def kept(name: str, item: h5py.Dataset | h5py.Group) -> None:  # None: visititems goes on
        if isinstance(item, h5py.Dataset):
            found[name] = item[()]

    with h5py.File(run) as f:
        f.visititems(kept)
    return found


def test_two_gloo_ranks_give_the_file_of_one_process(trained: Path, tmp_path: Path) -> None:
    cwd = _copy(trained, tmp_path / "ranks")
    for out, ranks in (("one.h5", 1), ("two.h5", 2)):  # 3 tiles of 2 rows: rank 0 explains two, rank 1 one
        _run(cwd, [*PATH, "--out", out], ranks)
    one, two = _datasets(cwd / "one.h5"), _datasets(cwd / "two.h5")
    assert sorted(one) == sorted(two) and "path/contributions" in one
    assert all(np.array_equal(two[name], one[name]) for name in one)
    assert np.count_nonzero(one["path/contributions"][2:4]) == 2 * 24  # rank 1's tile is there
    assert sorted(p.name for p in cwd.iterdir() if p.suffix == ".h5") == ["one.h5", "t.h5", "two.h5"]
