"""`ntk-explain compute`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ntk_explain.cli.app import Output, app, progress_bar, report, reported
from ntk_explain.cli.options import (
    FeatureDType,
    ProjectionKind,
    Seed,
    split_list,
    with_execution,
    with_inputs,
    with_resources,
)
from ntk_explain.options import KERNELS, InputSpec, KernelSpec, Resources, Shard
from ntk_explain.stages.execution import Execution


def report_compute(summary: dict, output: Output) -> None:
    """The summary of compute, from rank 0 alone under torchrun."""
    if Shard.from_environment().rank == 0:
        report(summary, output, _describe)


def _describe(summary: dict) -> None:
    n_test = f" and {summary['n_test']} test" if "n_test" in summary else ""
    typer.echo(
        f"wrote {summary['out']}: {', '.join(summary['kernels'])} for {summary['n_train']} train{n_test} points"
        f" in {summary['seconds']:.1f}s"
    )


@app.command()
@reported
@with_execution
@with_inputs
@with_resources
def compute(
    out: Annotated[Path, typer.Option(help="The run file (HDF5) to write.")],
    inputs: InputSpec,
    resources: Resources,
    how: Execution,
    output: Output,
    kernel: Annotated[str, typer.Option(help=f"Comma-separated kernels: {', '.join(KERNELS)}.")] = "trace",
    projection: Annotated[ProjectionKind, typer.Option(help="Random projection of the gradients.")] = "none",
    proj_dim: Annotated[int | None, typer.Option(help="Projection dimension (default 10240; pseudo 4096).")] = None,
    feature_dtype: Annotated[
        FeatureDType | None, typer.Option(help="Storage of projected features (default: the --dtype).")
    ] = None,
    params: Annotated[str | None, typer.Option(help="Parameter globs, e.g. 'fc.*' (default: all).")] = None,
    seed: Seed = 0,
) -> None:
    """Compute eNTK kernels (train×train, test×train and self-kernel diagonals) into a run file."""
    globs = split_list(params, "--params", None) if params is not None else None
    storage = FeatureDType(feature_dtype).value if feature_dtype else None
    kind = ProjectionKind(projection).value
    kernels = [KernelSpec(k, kind, proj_dim, seed, globs, storage) for k in split_list(kernel, "--kernel", KERNELS)]
    from ntk_explain.stages.compute import compute as run_compute  # after the options are checked: it loads torch

    with progress_bar(output.quiet or Shard.from_environment().rank > 0) as progress:
        summary = run_compute(inputs, kernels, out, resources, replace(how, progress=progress))
    report_compute(summary, output)
