"""Shared helpers of the tests that run the command line as real processes, or write its input files: the
environment of a child process, one CLI run, the arguments of the float64 test-CNN compute, the test MLP's data and
trained weights, data files of every format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import safetensors.numpy
import torch

from tests.models import mlp

REPO = Path(__file__).resolve().parents[1]
CLASSES = 3


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI child process: the repository importable, one thread, Python's default warnings."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="default")
    env.update(extra or {})
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m ntk_explain ARGS` in `cwd`, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "ntk_explain", *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def float64_cnn_compute(out: str, *extra: str) -> list[str]:
    """compute arguments for the float64 test CNN on data.npz (train and test) in 8-row tiles, writing `out`."""
    args = ["--model", "tests.models:cnn", "--train", "data.npz", "--test", "data.npz", "--out", out]
    return ["compute", *args, "--dtype", "float64", "--tile", "8", *extra]


def mlp_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n inputs of the test MLP and labels of its CLASSES classes."""
    return rng.normal(size=(n, 6)), rng.integers(0, CLASSES, n)


def trained_mlp() -> torch.nn.Module:
    """The test MLP with weights unlike the factory's, so loading them changes the logits."""
    model = mlp()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def write_arrays(path: Path, **named: np.ndarray) -> str:
    """A data file of the format its suffix names (.npz, .safetensors or HDF5) holding the arrays `named`."""
    if path.suffix == ".npz":
        np.savez(path, **named)
    elif path.suffix == ".safetensors":
        safetensors.numpy.save_file(named, path)
    else:
        with h5py.File(path, "w") as f:
            for key, value in named.items():
                f[key] = value
    return str(path)
