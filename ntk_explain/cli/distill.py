"""`ntk-explain distill`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ntk_explain.cli.app import Output, app, progress_bar, report, reported
from ntk_explain.cli.options import (
    Method,
    ProjectionKind,
    Seed,
    Selection,
    Target,
    with_execution,
    with_inputs,
    with_resources,
)
from ntk_explain.options import DEFAULT_REDUCTION, DistillSpec, InputSpec, KernelSpec, KipSettings, Resources, Shard
from ntk_explain.stages.execution import Execution


@app.command()
@reported
@with_execution
@with_inputs
@with_resources
def distill(
    out: Annotated[Path, typer.Option(help="The run file: new, or one of the same data (e.g. from compute).")],
    inputs: InputSpec,
    resources: Resources,
    how: Execution,
    output: Output,
    method: Annotated[
        Method, typer.Option(help="kip: synthetic inputs; gradient: synthetic features; select.")
    ] = "kip",
    select: Annotated[Selection, typer.Option(help="The subset rule of select, and kip's starting points.")] = "random",
    reduction: Annotated[
        float | None, typer.Option(help=f"Support size m = N/R (default {DEFAULT_REDUCTION:g}).", min=1.0)
    ] = None,
    per_class: Annotated[
        int | None, typer.Option(help="Support points per class, instead of --reduction.", min=1)
    ] = None,
    kernel: Annotated[
        str, typer.Option(help="pseudo or trace: the eNTK distilled and the support's kernel.")
    ] = "pseudo",
    projection: Annotated[
        ProjectionKind, typer.Option(help="Random projection of the gradients (not none).")
    ] = "sparse",
    proj_dim: Annotated[
        int | None, typer.Option(help="Projection dimension (default 10240; pseudo 4096).", min=1)
    ] = None,
    target: Annotated[Target, typer.Option(help="Classes of the training points: predictions or labels.")] = "model",
    steps: Annotated[int, typer.Option(help="kip: Adam steps.", min=1)] = 200,
    lr: Annotated[float, typer.Option(help="kip: Adam learning rate.", min=0.0)] = 1e-2,
    reg: Annotated[float, typer.Option(help="kip: ridge λ of K_ss + λ tr(K_ss)/m I.", min=0.0)] = 1e-3,
    kip_batch: Annotated[int, typer.Option(help="kip: real target points per step (class-balanced).", min=1)] = 256,
    learn_labels: Annotated[bool, typer.Option(help="kip: learn the support's labels too.")] = True,
    export: Annotated[Path | None, typer.Option(help="Also write the support to this .safetensors file.")] = None,
    seed: Seed = 0,
) -> None:
    """Distil the training set into m ≪ N support points (the distilled NTK); write their kernel with the test set."""
    if Shard.from_environment().rank > 0:
        return  # under torchrun, rank 0 distils and writes; distillation is not sharded
    spec = KernelSpec(kernel, ProjectionKind(projection).value, proj_dim, seed)
    settings = KipSettings(steps, lr, reg, kip_batch, learn_labels)
    plan = DistillSpec(
        Method(method).value, Selection(select).value, reduction, per_class, Target(target).value, settings, seed=seed
    )
    plan.check_kernel(spec)
    from ntk_explain.stages.distill import distill as run_distill  # after the options are checked: it loads torch

    with progress_bar(output.quiet) as progress:
        summary = run_distill(inputs, spec, plan, out, resources, replace(how, progress=progress), export)
    report(summary, output, _describe)


def _describe(summary: dict) -> None:
    typer.echo(
        f"wrote {summary['out']}: {summary['method']} support of {summary['m']} points for {summary['n_train']} "
        f"({summary['reduction']:.1f}× fewer), {summary['jacobians']} Jacobians in {summary['seconds']:.1f}s"
    )
