"""End-to-end tests of `ntk-explain compute` and `info`, run as real subprocesses (SPEC §6, §7).

Starting the CLI costs seconds (imports of torch, scikit-learn, ...), so one module fixture starts every
command at once in a thread pool and the tests then check the finished results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ntk_explain import store
from tests.models import mlp
from tests.processes import CLASSES, mlp_data, run_cli, trained_mlp

WORKERS = min(8, (os.cpu_count() or 1) + 2)
N_TRAIN, N_TEST = 12, 5
BASE = ["compute", "--model", "tests.models:mlp", "--train", "train.npz", "--out", "run.h5"]


# --------------------------------------------------------------------------------------------------
# Helpers


def _write_data(folder: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    data = {"train": mlp_data(rng, N_TRAIN), "test": mlp_data(rng, N_TEST)}
    for split, (x, y) in data.items():
        np.savez(folder / f"{split}.npz", x=x, y=y)
    return data


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (its path there) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# Happy paths


def _happy_jobs(root: Path) -> tuple[dict, dict]:
    """The successful computes, and the context their tests need."""
    folders = {name: root / name for name in ("base", "sparse", "st", "pt")}
    for folder in folders.values():
        folder.mkdir(parents=True)
        data = _write_data(folder)
    model = trained_mlp()
    save_file(model.state_dict(), str(folders["st"] / "w.safetensors"))
    torch.save(model.state_dict(), folders["pt"] / "w.pt")
    test = ["--test", "test.npz"]
    weighted = [*BASE, *test, "--dtype", "float64", "--json"]
    jobs = {
        "base": ([*BASE, *test, "--kernel", "trace,pseudo", "--json"], folders["base"], None),
        "sparse": ([*BASE, *test, "--projection", "sparse", "--proj-dim", "16", "--json"], folders["sparse"], None),
        "st": ([*weighted, "--weights", "w.safetensors"], folders["st"], None),
        "pt": ([*weighted, "--weights", "w.pt"], folders["pt"], None),
    }
    return jobs, {"folders": folders, "data": data, "model": model}


@pytest.fixture(scope="module")
def happy(runs):
    return runs["happy"]


def test_compute_json_summary_is_one_object(happy):
    result = happy["results"]["base"]
    _ok(result)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    summary = json.loads(lines[0])
    assert isinstance(summary, dict)
    assert set(summary["kernels"]) == {"trace", "pseudo"}
    assert summary["n_train"] == N_TRAIN and summary["n_test"] == N_TEST
    assert summary["classes"] == CLASSES
    assert Path(summary["out"]).name == "run.h5"
    assert all(k["complete"] is True for k in summary["kernels"].values())


def test_compute_writes_data_and_kernels(happy):
    _ok(happy["results"]["base"])
    folder = happy["folders"]["base"]
    assert sorted(p.name for p in folder.iterdir()) == ["run.h5", "test.npz", "train.npz"]  # no temp files left
    (x_train, y_train), (x_test, y_test) = happy["data"]["train"], happy["data"]["test"]
    with h5py.File(folder / "run.h5", "r") as f:
        for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            np.testing.assert_array_equal(f[f"data/{split}/labels"][()], y)
            np.testing.assert_array_equal(f[f"data/{split}/index"][()], np.arange(len(y)))
            with torch.no_grad():
                expected = mlp().float()(torch.from_numpy(x).float()).numpy()
            np.testing.assert_allclose(f[f"data/{split}/nn_logits"][()], expected, rtol=1e-5, atol=1e-6)
        for name in ("trace", "pseudo"):
            group = f[f"kernel/{name}"]
            assert bool(group.attrs["complete"]) is True
            assert group.attrs["kernel"] == name
            train_train = group["train_train"][()]
            assert train_train.shape == (N_TRAIN, N_TRAIN)
            assert group["test_train"].shape == (N_TEST, N_TRAIN)
            assert group["diag_train"].shape == (N_TRAIN,)
            assert group["diag_test"].shape == (N_TEST,)
            np.testing.assert_allclose(train_train, train_train.T, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(group["diag_train"][()], np.diag(train_train), rtol=1e-5)
            assert np.all(group["diag_train"][()] > 0) and np.all(group["diag_test"][()] > 0)


def test_compute_root_attrs(happy):
    folder = happy["folders"]["base"]
    with h5py.File(folder / "run.h5", "r") as f:
        attrs = dict(f.attrs)
    assert attrs["format"] == "ntk-explain"
    assert len(attrs["model_sha256"]) == 64 and int(attrs["model_sha256"], 16) >= 0
    assert attrs["weights_sha256"] == ""  # no --weights
    assert json.loads(attrs["data_sha256"]) == {
        "train": _sha256(folder / "train.npz"),
        "test": _sha256(folder / "test.npz"),
    }
    command = json.loads(attrs["command"])
    assert "compute" in command and "trace,pseudo" in command
    params = json.loads(attrs["params"])
    assert params["kernel"] == ["trace", "pseudo"] and params["model"] == "tests.models:mlp"
    assert int(attrs["seed"]) == 0


def test_info_json_lists_datasets(happy):
    result = happy["results"]["info_json"]
    _ok(result)
    info = json.loads(result.stdout)
    assert info["attrs"]["format"] == "ntk-explain"
    items = {item["path"]: item for item in info["items"]}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for name in ("labels", "index", "nn_logits"):
            assert items[f"/data/{split}/{name}"]["kind"] == "dataset"
        assert items[f"/data/{split}/nn_logits"]["shape"] == [n, CLASSES]
    for name in ("trace", "pseudo"):
        assert items[f"/kernel/{name}"]["kind"] == "group"
        assert items[f"/kernel/{name}/train_train"]["shape"] == [N_TRAIN, N_TRAIN]
        assert items[f"/kernel/{name}/test_train"]["shape"] == [N_TEST, N_TRAIN]
        assert items[f"/kernel/{name}/diag_train"]["shape"] == [N_TRAIN]
        assert items[f"/kernel/{name}/diag_test"]["shape"] == [N_TEST]


def test_info_table_names_datasets(happy):
    """`info RUN | grep PATH` must work: stdout is not a terminal here, so the table must not fold paths."""
    result = happy["results"]["info_table"]
    _ok(result)
    assert "/kernel/trace/train_train" in result.stdout
    assert "/data/train/nn_logits" in result.stdout


def test_compute_sparse_projection(happy):
    result = happy["results"]["sparse"]
    _ok(result)
    assert set(json.loads(result.stdout)["kernels"]) == {"trace-sparse-16"}
    with h5py.File(happy["folders"]["sparse"] / "run.h5", "r") as f:
        assert sorted(f["kernel"]) == ["trace-sparse-16"]
        group = f["kernel/trace-sparse-16"]
        assert group["features/train"].shape == (N_TRAIN, CLASSES, 16)
        assert group["features/test"].shape == (N_TEST, CLASSES, 16)
        assert group["train_train"].shape == (N_TRAIN, N_TRAIN)
        assert group.attrs["projection"] == "sparse" and int(group.attrs["proj_dim"]) == 16
        assert bool(group.attrs["complete"]) is True
        # the trace kernel of projected features is the sum over classes of their inner products
        g = group["features/train"][()].astype(np.float64)
        np.testing.assert_allclose(group["train_train"][()], np.einsum("nkd,mkd->nm", g, g), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["st", "pt"])
def test_compute_loads_weights(happy, kind):
    result = happy["results"][kind]
    _ok(result)
    folder = happy["folders"][kind]
    weights = folder / ("w.safetensors" if kind == "st" else "w.pt")
    model = happy["model"]
    with h5py.File(folder / "run.h5", "r") as f:
        assert f.attrs["weights_sha256"] == _sha256(weights)
        for split in ("train", "test"):
            x = torch.from_numpy(happy["data"][split][0])
            with torch.no_grad():
                expected, untrained = model(x).numpy(), mlp()(x).numpy()
            stored = f[f"data/{split}/nn_logits"][()]
            assert stored.dtype == np.float64
            assert not np.allclose(expected, untrained)  # the weights matter
            np.testing.assert_allclose(stored, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Bad input (SPEC §7): exit code, one stderr line, no traceback, nothing written


def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        np.savez(folder / "train.npz", **arrays)

    return write


def _valid(folder: Path) -> None:
    _write_data(folder)


def _weights(drop: str | None = None, reshape: str | None = None) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        _write_data(folder)
        state = {k: v.contiguous() for k, v in mlp().state_dict().items()}
        if drop:
            del state[drop]
        if reshape:
            state[reshape] = torch.zeros(8, 5, dtype=torch.float64)
        save_file(state, str(folder / "w.safetensors"))

    return write


class _Payload:
    """Unpickling this calls open(path, "w"): a file appears if the loader runs arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_bomb(folder: Path) -> None:
    _write_data(folder)
    torch.save({"0.weight": _Payload(folder / "MARKER")}, folder / "w.pt")


def _existing_out(folder: Path) -> None:
    _write_data(folder)
    (folder / "run.h5").write_bytes(b"precious bytes, not a run file")


def _text_file(folder: Path) -> None:
    (folder / "run.h5").write_text("this is not HDF5\n")


def _hf_without_config(folder: Path) -> None:
    """A directory with weights but no config.json, as `hf:bert`."""
    _write_data(folder)
    (folder / "bert").mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "bert" / "model.safetensors"))


@dataclass(frozen=True)
class Case:
    name: str
    code: int
    args: list[str]
    setup: Callable[[Path], None] = _valid
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


rng = np.random.default_rng(0)
X, Y = mlp_data(rng, N_TRAIN)
X_NAN = X.copy()
X_NAN[4, 2] = np.nan

CASES = [
    Case("missing_train", 3, BASE, setup=lambda folder: None),
    Case("corrupt_npz", 3, BASE, setup=lambda f: (f / "train.npz").write_bytes(np.random.default_rng(1).bytes(500))),
    Case("npz_without_x", 3, BASE, setup=_npz(features=X, y=Y)),
    Case("x_with_nan", 3, BASE, setup=_npz(x=X_NAN, y=Y)),
    Case("labels_too_large", 3, BASE, setup=_npz(x=X, y=np.where(np.arange(N_TRAIN) == 7, CLASSES, Y))),
    Case("labels_negative", 3, BASE, setup=_npz(x=X, y=np.where(np.arange(N_TRAIN) == 7, -1, Y))),
    Case("length_mismatch", 3, BASE, setup=_npz(x=X, y=Y[:-1])),
    Case("empty_set", 3, BASE, setup=_npz(x=X[:0], y=Y[:0])),
    Case("wrong_feature_count", 3, BASE, setup=_npz(x=X[:, :5], y=Y)),
    Case("weights_missing_key", 3, [*BASE, "--weights", "w.safetensors"], setup=_weights(drop="3.bias")),
    Case("weights_wrong_shape", 3, [*BASE, "--weights", "w.safetensors"], setup=_weights(reshape="1.weight")),
    Case("weights_pickle_code", 3, [*BASE, "--weights", "w.pt"], setup=_pickle_bomb),
    Case("unknown_model_module", 3, [*BASE[:2], "no_such_module_xyz:mlp", *BASE[3:]]),
    Case("existing_out", 3, BASE, setup=_existing_out),
    Case("unknown_option", 2, [*BASE, "--frobnicate"]),
    Case("invalid_kernel", 2, [*BASE, "--kernel", "trace,bogus"]),
    Case("invalid_projection", 2, [*BASE, "--projection", "bogus"]),
    Case(
        "sketch_dim_below_groups", 2, [*BASE, "--kernel", "pseudo", "--projection", "tensorsketch", "--proj-dim", "8"]
    ),
    Case("invalid_max_memory", 2, [*BASE, "--max-memory", "12 parsecs"]),
    Case("cuda_without_cuda", 2, [*BASE, "--device", "cuda"], env={"CUDA_VISIBLE_DEVICES": ""}),
    Case("model_kwargs_not_json", 2, [*BASE, "--model-kwargs", "{classes: 3"]),
    Case("params_match_nothing", 2, [*BASE, "--params", "nomatch.*"]),
    Case("x_key_names_no_array", 3, [*BASE, "--x-key", "x,mask"]),
    Case("input_arrays_of_different_lengths", 3, [*BASE, "--x-key", "x,mask"], setup=_npz(x=X, mask=X[:-1], y=Y)),
    Case("output_key_missing", 3, [*BASE, "--output-key", "scores"]),
    Case("hf_without_config", 3, [*BASE[:2], "hf:bert", *BASE[3:]], setup=_hf_without_config),
    Case("info_missing_file", 3, ["info", "run.h5"], setup=lambda folder: None),
    Case("info_not_hdf5", 3, ["info", "run.h5"], setup=_text_file),
]


def _bad_jobs(root: Path, selected: set[str]) -> tuple[dict, dict]:
    """The selected bad-input cases, --overwrite and --debug; and each folder's files before the run."""
    jobs, before = {}, {}
    for case in CASES:
        if case.name in selected:
            folder = root / case.name
            folder.mkdir(parents=True)
            case.setup(folder)
            jobs[case.name] = (case.args, folder, case.env)
    for name, args in (("overwrite", [*BASE, "--overwrite", "--quiet"]), ("debug", [*BASE, "--debug"])):
        folder = root / name
        folder.mkdir(parents=True)
        _existing_out(folder)
        if name == "debug":
            (folder / "run.h5").unlink()
            (folder / "train.npz").unlink()
        jobs[name] = (args, folder, None)
    for name, (_, folder, _) in jobs.items():
        before[name] = _files(folder)
    return jobs, before


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """Every CLI run of this module, started at once in one pool (`info` once the base run is done)."""
    root = tmp_path_factory.mktemp("cli")
    selected = {
        str(item.callspec.params["case"])
        for item in request.session.items
        if hasattr(item, "callspec") and "case" in item.callspec.params
    }
    happy_jobs, context = _happy_jobs(root / "happy")
    bad_jobs, before = _bad_jobs(root / "bad", selected)
    base = context["folders"]["base"]
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {key: pool.submit(run_cli, *job) for key, job in {**happy_jobs, **bad_jobs}.items()}

        def after_base(args: list[str]) -> subprocess.CompletedProcess:
            futures["base"].result()
            return run_cli(args, base)

        for key, args in (("info_json", ["info", "run.h5", "--json"]), ("info_table", ["info", "run.h5"])):
            futures[key] = pool.submit(after_base, args)
        results = {key: future.result() for key, future in futures.items()}
    return {
        "happy": {**context, "results": results},
        "bad": {name: (results[name], folder, before[name]) for name, (_, folder, _) in bad_jobs.items()},
    }


@pytest.fixture(scope="module")
def bad(runs):
    return runs["bad"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(bad, case):
    result, folder, before = bad[case.name]
    assert result.returncode == case.code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert result.stderr.strip()
    if case.code != 2:
        lines = result.stderr.rstrip("\n").split("\n")
        assert len(lines) == 1 and lines[0].strip(), result.stderr
    # nothing written, nothing changed, no temporary file left behind
    after = _files(folder)
    assert after == before
    if case.args[0] == "compute" and "run.h5" not in before:
        assert not (folder / "run.h5").exists()
    assert not any("partial" in name for name in after)
    assert not (folder / "MARKER").exists()


def test_pickle_payload_would_run_code(tmp_path):
    """The payload of `weights_pickle_code` does create its marker when unpickled without weights_only."""
    torch.save({"0.weight": _Payload(tmp_path / "MARKER")}, tmp_path / "w.pt")
    torch.load(tmp_path / "w.pt", weights_only=False).popitem()[1].close()
    assert (tmp_path / "MARKER").exists()


def test_overwrite_replaces_existing_out(bad):
    result, folder, before = bad["overwrite"]
    _ok(result)
    assert (folder / "run.h5").read_bytes() != before["run.h5"]
    with h5py.File(folder / "run.h5", "r") as f:
        assert f.attrs["format"] == "ntk-explain"
        assert f["kernel/trace/train_train"].shape == (N_TRAIN, N_TRAIN)
    assert sorted(p.name for p in folder.iterdir()) == ["run.h5", "test.npz", "train.npz"]


def test_debug_shows_traceback(bad):
    result, folder, _ = bad["debug"]
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "train.npz" in result.stderr
    assert not (folder / "run.h5").exists()


def test_a_second_process_writing_the_run_file_is_refused(happy, tmp_path):
    """attribute in another process while this one holds run.h5 for writing: exit 3, one line, the file unchanged."""
    run = tmp_path / "run.h5"
    shutil.copyfile(happy["folders"]["base"] / "run.h5", run)
    before = _sha256(run)
    with store.update_run(run):
        result = run_cli(["attribute", "run.h5", "--quiet"], tmp_path)
        assert result.returncode == 3 and "another process" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and _sha256(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_entry_point_keeps_freed_memory_for_reuse():
    """The CLI's allocator setting (glibc mallopt) is accepted on Linux, where CI runs; elsewhere it changes nothing."""
    from ntk_explain.resources import retain_freed_memory

    assert retain_freed_memory() == sys.platform.startswith("linux")


def test_quiet_silences_the_warnings_we_trigger(tmp_path):
    """The torch Transformer runs under vmap, where torch warns that its attention has no batching rule: shown by
    default, silenced with --quiet, as our own output is."""
    from tests.architectures import ARCHITECTURES

    ids = ARCHITECTURES["transformer_torch"].inputs(4, 0).numpy()
    np.savez(tmp_path / "train.npz", x=ids, y=np.zeros(4, dtype=np.int64))
    args = ["compute", "--model", "tests.architectures:transformer_torch", "--train", "train.npz", "--dtype", "float64"]
    loud, quiet = (
        run_cli([*args, "--out", "loud.h5"], tmp_path),
        run_cli([*args, "--out", "quiet.h5", "--quiet"], tmp_path),
    )
    _ok(loud)
    _ok(quiet)
    assert "UserWarning" in loud.stderr
    assert quiet.stdout == quiet.stderr == ""
