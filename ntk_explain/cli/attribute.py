"""`ntk-explain attribute`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ntk_explain.cli.app import Output, app, progress_bar, report, reported, stdout
from ntk_explain.cli.options import (
    ClassWeight,
    FitOn,
    Normalize,
    Surrogate,
    Target,
    with_budget,
    with_execution,
)
from ntk_explain.options import AttributeSpec, Resources, Shard, SurrogateSpec
from ntk_explain.stages.execution import Execution


@app.command()
@reported
@with_execution
@with_budget
def attribute(
    run: Annotated[Path, typer.Argument(help="A run file written by compute.")],
    resources: Resources,
    how: Execution,
    output: Output,
    kernel: Annotated[str | None, typer.Option(help="Kernel group (default: trace, or the only one).")] = None,
    surrogate: Annotated[
        Surrogate, typer.Option(help="kglm: kernel logistic regression; ridge: of the logits.")
    ] = "kglm",
    target: Annotated[Target, typer.Option(help="kGLM targets: the network's predictions or the labels.")] = "model",
    alpha: Annotated[float, typer.Option(help="L2 penalty α of mean loss + α‖W‖² (ridge: λ = αN).")] = 1e-4,
    normalize: Annotated[
        Normalize, typer.Option(help="cosine; scale: by the mean training self-kernel; none: raw.")
    ] = "cosine",
    class_weight: Annotated[ClassWeight, typer.Option(help="Weigh classes by inverse frequency.")] = "none",
    fit_on: Annotated[
        FitOn, typer.Option(help="--kernel distilled: fit on the support's labels, or on the N training points.")
    ] = "support",
    top_k: Annotated[int, typer.Option(help="Proponents and opponents kept per point.", min=1)] = 10,
    all_classes: Annotated[bool, typer.Option(help="Also store (M, N, C) scores for every class.")] = False,
) -> None:
    """Fit a kernel surrogate, write data-attribution scores and faithfulness metrics into the run file."""
    if Shard.from_environment().rank > 0:
        return  # under torchrun, rank 0 fits and writes; the fit is not sharded
    fit = SurrogateSpec(
        Surrogate(surrogate).value,
        alpha,
        Target(target).value,
        Normalize(normalize).value,
        ClassWeight(class_weight).value == "balanced",
        FitOn(fit_on).value,
    )
    spec = AttributeSpec(kernel, fit, top_k, all_classes)
    from ntk_explain.cli.render import metrics_table  # after the options are checked: these load torch
    from ntk_explain.stages.attribute import attribute as run_attribute

    with progress_bar(output.quiet) as progress:
        summary = run_attribute(run, spec, resources, replace(how, progress=progress))
    report(summary, output, lambda done: stdout.print(metrics_table(done["faithfulness"])))
