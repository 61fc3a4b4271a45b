"""`ntk-explain path-kernel`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ntk_explain.cli.app import Output, app, progress_bar, report, reported
from ntk_explain.cli.options import Seed, with_execution, with_inputs, with_resources
from ntk_explain.errors import UsageError
from ntk_explain.options import InputSpec, PathSpec, Resources, Shard, step_window
from ntk_explain.stages.execution import Execution


def _describe(summary: dict) -> None:
    agreement = (
        f"; against the kGLM explanation: mean Kendall τ {summary['mean_kendall_tau']:.3f}, top-10 overlap "
        f"{summary['mean_top10_overlap']:.3f}"
        if "mean_kendall_tau" in summary
        else ""
    )
    typer.echo(
        f"wrote {summary['out']}: /path of {summary['n_explained']} points over steps {summary['steps']} "
        f"({summary['optimizer']}), relative residual {summary['relative_residual']:.2e}{agreement}"
        f" in {summary['seconds']:.1f}s"
    )


@app.command("path-kernel")
@reported
@with_execution
@with_inputs
@with_resources
def path_kernel(
    trajectory: Annotated[Path, typer.Option(help="The trajectory file (HDF5) that train or a Recorder wrote.")],
    inputs: InputSpec,
    resources: Resources,
    how: Execution,
    output: Output,
    out: Annotated[Path | None, typer.Option(help="A new run file (HDF5) to write.")] = None,
    run: Annotated[
        Path | None, typer.Option(help="An existing run file of the same model, weights and data to add /path to.")
    ] = None,
    nodes: Annotated[int, typer.Option(help="Gauss–Legendre nodes per quadrature panel.", min=1, max=64)] = 8,
    panels: Annotated[
        int, typer.Option(help="Equal panels of every segment, shared by all points (a composite rule).", min=1, max=64)
    ] = 1,
    steps: Annotated[
        str | None, typer.Option(help="The window a:b of training steps explained (default: all).")
    ] = None,
    all_classes: Annotated[bool, typer.Option(help="Store (M, N, C) contributions of every class.")] = False,
    top_k: Annotated[int, typer.Option(help="Proponents and opponents kept per point.", min=1)] = 10,
    tolerance: Annotated[
        float | None, typer.Option(help="Relative quadrature tolerance (default 1e-12 in float64, 1e-5 in float32).")
    ] = None,
    depth: Annotated[
        int, typer.Option(help="Most levels of splitting a failing panel in 4 (0: never split).", min=0)
    ] = 40,
    projection: Annotated[
        str, typer.Option(help="none, or sparse: unbiased contributions from CountSketched Jacobians.")
    ] = "none",
    proj_dim: Annotated[int, typer.Option(help="Rows of the projection.", min=1)] = 10240,
    seed: Seed = 0,
) -> None:
    """The exact path kernel of a recorded training: each training point's contribution to each prediction."""
    if (out is None) == (run is None):
        raise UsageError("give one of --out (a new run file) or --run (an existing one)")
    window = step_window(steps)
    spec = PathSpec(
        str(trajectory), nodes, window, all_classes, top_k, tolerance, depth, panels, projection, proj_dim, seed
    )
    from ntk_explain.stages.path_kernel import path_kernel as run_path_kernel  # after the checks: it loads torch

    target = out if out is not None else run
    assert target is not None
    rank = Shard.from_environment().rank  # under torchrun rank 0 writes the file and reports
    with progress_bar(output.quiet or rank > 0) as progress:
        summary = run_path_kernel(
            inputs, spec, target, resources, replace(how, progress=progress), into=run is not None
        )
    if rank == 0:
        report(summary, output, _describe)
