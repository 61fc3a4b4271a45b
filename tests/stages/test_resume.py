"""Interrupted computes and attributes and `--resume` (SPEC §6): a compute killed at seeded random points (SIGKILL, no
cleanup) or stopped by SIGTERM resumes to kernels `np.array_equal` to an uninterrupted run's, in float64; an
attribute, to the same surrogate, attribution and faithfulness.

The runs are real processes; a small driver counts the run file's dataset writes and flushes and kills its own
process at the k-th one, so the kill points are reproducible.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from ntk_explain import store
from tests.processes import cli_env, float64_cnn_compute

N_TRAIN, N_TEST = 40, 12
CONFIGS = {  # two kernels through the factor tiles; one through stored projected features
    "exact": ["--kernel", "trace,pseudo"],
    "projected": ["--kernel", "pseudo", "--projection", "sparse", "--proj-dim", "64"],
}
BLOCKS = ("train_train", "test_train", "diag_train", "diag_test")

# Runs `ntk-explain ARGS` after patching h5py so that its AT-th dataset write or file flush (counted together) sends
# SIGNAL to this process; prints the number of those calls on stderr's last line when it gets that far.
DRIVER = """
import os, signal, sys
import h5py
from ntk_explain import cli

at, sig, args = int(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3:]
calls = 0

def counted(original):
    def call(*a, **k):
        global calls
        calls += 1
        if calls == at:
            os.kill(os.getpid(), sig)
        return original(*a, **k)
    return call

h5py.Dataset.__setitem__ = counted(h5py.Dataset.__setitem__)
h5py.File.flush = counted(h5py.File.flush)
sys.argv = ["ntk-explain", *args]
try:
    cli.main()
finally:
    print(f"calls={calls}", file=sys.stderr)
"""


def _compute(cwd: Path, config: str, at: int = 0, sig: str = "SIGKILL", resume: bool = False) -> tuple[int, str]:
    args = float64_cnn_compute("run.h5", "--json", *CONFIGS[config], *(["--resume"] if resume else []))
    return _driven(cwd, args, at, sig)


def _driven(cwd: Path, args: list[str], at: int, sig: str) -> tuple[int, str]:
    """`ntk-explain ARGS` in `cwd` under DRIVER: its exit code and stderr."""
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(at), sig, *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stderr


def _calls(stderr: str) -> int:
    return int(stderr.strip().splitlines()[-1].removeprefix("calls="))


def _kernels(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {f"{name}/{block}": f["kernel"][name][block][()] for name in f["kernel"] for block in BLOCKS}


@dataclass(frozen=True)
class Reference:
    kernels: dict[str, np.ndarray]  # of an uninterrupted run
    calls: int  # its dataset writes and flushes
    data: Path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reference]:
    rng = np.random.default_rng(0)
    runs = {}
    for config in CONFIGS:
        cwd = tmp_path_factory.mktemp(config)
        np.savez(cwd / "data.npz", x=rng.normal(size=(N_TRAIN, 1, 4, 4)), y=rng.integers(0, 3, N_TRAIN))
        code, stderr = _compute(cwd, config)
        assert code == 0, stderr
        runs[config] = Reference(_kernels(cwd / "run.h5"), _calls(stderr), cwd / "data.npz")
    return runs


def _fresh(cwd: Path, reference: Reference) -> Path:
    cwd.mkdir()
    shutil.copy(reference.data, cwd / "data.npz")
    return cwd


@pytest.mark.parametrize("config", CONFIGS)
def test_sigkill_at_random_points_then_resume_gives_the_same_kernels(tmp_path: Path, reference, config: str) -> None:
    expected, total = reference[config].kernels, reference[config].calls
    points = sorted(np.random.default_rng(list(CONFIGS).index(config)).choice(np.arange(2, total), 3, replace=False))
    skipped = []
    for at in points:
        cwd = _fresh(tmp_path / f"kill{at}", reference[config])
        code, _ = _compute(cwd, config, at=int(at))
        assert code == -signal.SIGKILL
        assert not (cwd / "run.h5").exists()
        code, stderr = _compute(cwd, config, resume=True)
        assert code == 0, stderr
        assert not store.partial_path(cwd / "run.h5").exists() and not (cwd / ".run.h5.lock").exists()
        got = _kernels(cwd / "run.h5")
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert np.array_equal(got[key], value), (at, key)
        skipped.append(total - _calls(stderr))
    assert max(skipped) > total // 4, (points, skipped)  # some resumes continued, rather than starting over


def test_sigterm_keeps_an_incomplete_partial_that_resume_completes(tmp_path: Path, reference) -> None:
    expected, total = reference["exact"].kernels, reference["exact"].calls
    cwd = _fresh(tmp_path / "run", reference["exact"])
    code, stderr = _compute(cwd, "exact", at=total // 2, sig="SIGTERM")
    assert code == 130
    message = stderr.strip().splitlines()[0]
    assert message.startswith("interrupted: the partial run is kept in") and "--resume" in message
    assert "Traceback" not in stderr
    assert not (cwd / "run.h5").exists()
    partial = store.partial_path(cwd / "run.h5")
    with h5py.File(partial, "r") as f:
        assert not f.attrs["complete"]
        assert [bool(f["kernel"][name].attrs["complete"]) for name in f["kernel"]] in ([False], [False, True])
    code, stderr = _compute(cwd, "exact", resume=True)
    assert code == 0, stderr
    got = _kernels(cwd / "run.h5")
    assert all(np.array_equal(got[key], value) for key, value in expected.items())
    with h5py.File(cwd / "run.h5", "r") as f:
        assert f.attrs["complete"] and f.attrs["resumed"] == 1
    assert not partial.exists()


def test_resume_with_other_options_is_refused_and_keeps_the_partial(tmp_path: Path, reference) -> None:
    cwd = _fresh(tmp_path / "run", reference["projected"])
    assert _compute(cwd, "projected", at=reference["projected"].calls // 2)[0] == -signal.SIGKILL
    partial = store.partial_path(cwd / "run.h5")
    before = partial.read_bytes()
    code, stderr = _compute(cwd, "exact", resume=True)
    assert code == 3
    assert stderr.strip().splitlines()[0].startswith("error: cannot resume: the partial run") and "params" in stderr
    assert partial.read_bytes() == before and not (cwd / "run.h5").exists()
    os.remove(partial)


def _attribute(cwd: Path, at: int = 0, sig: str = "SIGKILL", resume: bool = False, kernel: str = "trace") -> tuple:
    # 26 kB: the 40×40 float64 fit kernel fits, explained rows stream in blocks of 7 (with --all-classes)
    args = ["attribute", "run.h5", "--kernel", kernel, "--device", "cpu", "--max-memory", "26000", "--all-classes"]
    return _driven(cwd, [*args, "--json", *(["--resume"] if resume else [])], at, sig)


def _attribution(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        groups = [f[name] for name in ("surrogate", "attribution", "faithfulness")]
        return {ds.name: ds[()] for group in groups for ds in group.values()} | {
            f"{group.name}:{key}": value for group in groups for key, value in store.attrs_dict(group).items()
        }


def _with_run(cwd: Path, reference: Reference) -> Path:
    cwd.mkdir()
    shutil.copy(reference.data.parent / "run.h5", cwd / "run.h5")
    return cwd


def test_attribute_killed_or_stopped_then_resumed_gives_the_same_attribution(tmp_path: Path, reference) -> None:
    """Killed at seeded points (the fit, the row blocks, the end), the run file stays as it was; --resume gives the
    surrogate, scores and metrics of an uninterrupted attribute. SIGTERM keeps an incomplete partial (exit 130);
    resuming it with other options is refused and keeps it."""
    cwd = _with_run(tmp_path / "whole", reference["exact"])
    code, stderr = _attribute(cwd)
    assert code == 0, stderr
    expected, total = _attribution(cwd / "run.h5"), _calls(stderr)
    with h5py.File(cwd / "run.h5", "r") as f:
        scores = f["attribution/scores"]
        assert scores.attrs["tiles_done"] == -(-scores.shape[0] // scores.attrs["tile"]) > 1  # several row blocks
    source = (reference["exact"].data.parent / "run.h5").read_bytes()
    skipped = []
    for at in sorted(np.random.default_rng(7).choice(np.arange(2, total), 3, replace=False)):
        cwd = _with_run(tmp_path / f"kill{at}", reference["exact"])
        assert _attribute(cwd, at=int(at))[0] == -signal.SIGKILL
        assert (cwd / "run.h5").read_bytes() == source
        code, stderr = _attribute(cwd, resume=True)
        assert code == 0, stderr
        got = _attribution(cwd / "run.h5")
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[key], value) for key, value in expected.items()), at
        assert not store.partial_path(cwd / "run.h5").exists()
        skipped.append(total - _calls(stderr))
    assert max(skipped) > 0, skipped  # some resumes kept the fit or row blocks
    cwd = _with_run(tmp_path / "term", reference["exact"])
    code, stderr = _attribute(cwd, at=total // 2, sig="SIGTERM")
    assert code == 130 and stderr.startswith("interrupted: the partial run is kept in"), stderr
    partial = store.partial_path(cwd / "run.h5")
    with h5py.File(partial, "r") as f:
        assert not f.attrs["complete"] and "update" in f.attrs
    before = partial.read_bytes()
    code, stderr = _attribute(cwd, resume=True, kernel="pseudo")
    assert code == 3 and "answers other options" in stderr, stderr
    assert partial.read_bytes() == before and (cwd / "run.h5").read_bytes() == source
    code, stderr = _attribute(cwd, resume=True)
    assert code == 0, stderr
    assert all(np.array_equal(_attribution(cwd / "run.h5")[key], value) for key, value in expected.items())


def _distill(cwd: Path, at: int = 0, sig: str = "SIGKILL", resume: bool = False) -> tuple[int, str]:
    """kip on the pseudo kernel: the projected features in tiles of 8 rows, then 25 Adam steps (checkpoints at
    steps 10 and 20), then /distill and /kernel/distilled."""
    args = ["distill", "--model", "tests.models:cnn", "--train", "data.npz", "--test", "data.npz", "--out", "run.h5"]
    args += ["--dtype", "float64", "--tile", "8", "--kernel", "pseudo", "--projection", "sparse", "--proj-dim", "64"]
    args += ["--method", "kip", "--steps", "25", "--per-class", "2", "--kip-batch", "12", "--json"]
    return _driven(cwd, [*args, *(["--resume"] if resume else [])], at, sig)


def _distilled(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        datasets: dict[str, np.ndarray] = {}
        for name in ("distill", "kernel/distilled"):
            f[name].visititems(
                lambda key, obj, name=name: (
                    datasets.update({f"{name}/{key}": obj[()]}) if isinstance(obj, h5py.Dataset) else None
                )
            )
        return datasets


def test_distill_killed_then_resumed_gives_the_same_support(tmp_path: Path, reference) -> None:
    """Killed at seeded points (the features' tiles, kip's steps, the writing of the support), --resume continues
    from the scratch file's features and kip state to a support and kernel `np.array_equal` to an uninterrupted
    run's; the scratch file and the partial file are gone after it."""
    cwd = _fresh(tmp_path / "whole", reference["exact"])
    code, stderr = _distill(cwd)
    assert code == 0, stderr
    expected, total = _distilled(cwd / "run.h5"), _calls(stderr)
    skipped = []
    for at in sorted(np.random.default_rng(11).choice(np.arange(2, total), 3, replace=False)):
        cwd = _fresh(tmp_path / f"kill{at}", reference["exact"])
        assert _distill(cwd, at=int(at))[0] == -signal.SIGKILL
        assert not (cwd / "run.h5").exists()
        code, stderr = _distill(cwd, resume=True)
        assert code == 0, stderr
        got = _distilled(cwd / "run.h5")
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[key], value) for key, value in expected.items()), at
        assert not store.scratch_path(cwd / "run.h5").exists() and not store.partial_path(cwd / "run.h5").exists()
        skipped.append(total - _calls(stderr))
    assert max(skipped) > 0, skipped  # some resumes kept features or kip steps
