"""The stage pattern: under --resume a finished stage of the same request does nothing, one of another request is
refused (exit 3), and without --resume an existing result is refused as before; the run file never changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ntk_explain.cli import app

DATA = ["--model", "tests.models:mlp", "--train", "{data}", "--test", "{data}"]
STAGES = {
    # the stage's command line, and options that change its request
    "compute": (["compute", *DATA, "--kernel", "trace", "--out", "{run}"], ["--kernel", "trace,pseudo"]),
    "attribute": (["attribute", "{run}"], ["--alpha", "0.1"]),
    "distill": (["distill", *DATA, "--method", "select", "--per-class", "2", "--out", "{run}"], ["--per-class", "3"]),
}


def _invoke(args: list[str], tmp_path: Path, *extra: str):
    paths = {"data": str(tmp_path / "data.npz"), "run": str(tmp_path / "run.h5")}
    return CliRunner().invoke(app, [arg.format(**paths) for arg in args] + list(extra))


@pytest.mark.parametrize("stage", STAGES)
def test_a_finished_stage_is_skipped_under_resume_and_another_request_refused(tmp_path: Path, stage: str) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(30, 6)), y=rng.integers(0, 3, 30))
    if stage == "attribute":
        assert _invoke(STAGES["compute"][0], tmp_path, "--quiet").exit_code == 0
    args, other = STAGES[stage]
    first = _invoke(args, tmp_path, "--quiet")
    assert first.exit_code == 0, first.output
    before = (tmp_path / "run.h5").read_bytes()
    again = _invoke(args, tmp_path, "--resume", "--max-memory", "1GB", "--json")  # resources are not the request
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == {"out": str(tmp_path / "run.h5"), "skipped": True}
    told = _invoke(args, tmp_path, "--resume")
    assert told.exit_code == 0 and "done already with these options" in told.stdout
    refused = _invoke(args + other, tmp_path, "--resume")
    assert refused.exit_code == 3 and "was made with other options" in refused.stderr
    plain = _invoke(args, tmp_path)
    assert plain.exit_code == 3 and "--overwrite" in plain.stderr
    assert (tmp_path / "run.h5").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "run.h5"]  # no partial or scratch left
