"""Time two checkouts of ntk-explain with the same bench workers, alternating, to tell a change's cost from noise.

    git worktree add /tmp/before <commit>
    .venv/bin/python scripts/compare_checkouts.py /tmp/before . --rounds 5

Each round runs every job below from both checkouts (the order alternates between rounds), each a fresh process of
that checkout's `scripts/bench.py --worker …` with `PYTHONPATH` pointing at it, and keeps each worker's best time.
Printed per job: the best and the median over rounds of both, and their ratios (after / before). The jobs are the
timed parts of workloads 1, 3 and 7 (each worker plans and warms up before its timed calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TRACE = ["--worker", "ours", "--repeats", "3", "--budget", str(2 * 2**30)]
PROJECT = ["--worker", "project", "--n", "1024", "--repeats", "3"]
JOBS = {
    "1 MLP exact trace N=256": [*TRACE, "--model", "mlp", "--n", "256"],
    "7 MLP exact trace N=1024": [*TRACE, "--model", "mlp", "--n", "1024"],
    "7 CNN exact trace N=1024": [*TRACE, "--model", "cnn", "--n", "1024"],
    "3 CNN tensorsketch features": [*PROJECT, "--model", "cnn", "--kind", "tensorsketch"],
    "3 MLP tensorsketch features": [*PROJECT, "--model", "mlp", "--kind", "tensorsketch"],
    "3 MLP sparse features": [*PROJECT, "--model", "mlp", "--kind", "sparse"],
}


def best_time(root: Path, args: list[str]) -> float:
    """The best time of one bench worker of the checkout at `root`, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(root)}
        command = [sys.executable, str(root / "scripts" / "bench.py"), *args, "--device", "cpu", "--tmp", tmp]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["best_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    times: dict[str, dict[str, list[float]]] = {job: {"before": [], "after": []} for job in JOBS}
    for round_ in range(args.rounds):
        order = list(checkouts.items()) if round_ % 2 == 0 else list(reversed(checkouts.items()))
        for job, job_args in JOBS.items():
            for label, root in order:
                times[job][label].append(best_time(root, job_args))
        print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    print("| job | before best / median ms | after best / median ms | after/before (best, median) |")
    print("|---|---:|---:|---:|")
    for job, runs in times.items():
        before, after = runs["before"], runs["after"]
        b, a = min(before), min(after)
        mb, ma = statistics.median(before), statistics.median(after)
        cells = [
            job,
            f"{1e3 * b:.1f} / {1e3 * mb:.1f}",
            f"{1e3 * a:.1f} / {1e3 * ma:.1f}",
            f"{a / b:.2f}×, {ma / mb:.2f}×",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
