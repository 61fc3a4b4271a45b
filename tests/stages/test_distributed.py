"""`torchrun --nproc-per-node 2` (gloo, CPU) against one process: the same kernels and attribution (SPEC §7)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from ntk_explain import store
from tests.processes import cli_env, float64_cnn_compute

CONFIGS = {
    "exact": ["--kernel", "trace,pseudo"],
    "projected": ["--kernel", "pseudo", "--projection", "sparse", "--proj-dim", "64"],
}
ATTRIBUTION = ("scores", "class", "topk_index", "topk_score")


def _run(cwd: Path, args: list[str], ranks: int) -> None:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "ntk_explain", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _compute(out: str, config: str) -> list[str]:
    # --n-test 20 in 8-row tiles: 5 train and 3 test row tiles; rank 0 computes 3 and 2 of them, rank 1 the others
    return float64_cnn_compute(out, "--n-test", "20", "--quiet", *CONFIGS[config])


@pytest.mark.parametrize("config", CONFIGS)
def test_two_gloo_ranks_give_the_kernels_and_attribution_of_one_process(tmp_path: Path, config: str) -> None:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(40, 1, 4, 4)), y=rng.integers(0, 3, 40))
    for out, ranks in (("one.h5", 1), ("two.h5", 2)):
        _run(tmp_path, _compute(out, config), ranks)
        _run(tmp_path, ["attribute", out, "--quiet"], ranks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "one.h5", "two.h5"]  # shards joined, removed
    with h5py.File(tmp_path / "one.h5", "r") as one, h5py.File(tmp_path / "two.h5", "r") as two:
        assert two.attrs["world_size"] == 2 and "world_size" not in one.attrs
        names = list(one["kernel"])
        assert names == list(two["kernel"]) and names
        for name in names:
            group = one["kernel"][name]
            for block in [*store.SHARDED, *(f"features/{s}" for s in ("train", "test") if f"features/{s}" in group)]:
                expected = group[block][()]
                assert np.array_equal(two["kernel"][name][block][()], expected), (name, block)
                if block in store.SHARDED:
                    assert np.count_nonzero(expected) == expected.size  # every tile of every rank is there
        for key in ATTRIBUTION:
            assert np.array_equal(two["attribution"][key][()], one["attribution"][key][()]), key
