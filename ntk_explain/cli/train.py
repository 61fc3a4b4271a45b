"""`ntk-explain train`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ntk_explain.cli.app import Output, app, progress_bar, report, reported
from ntk_explain.cli.options import _choices, with_budget, with_execution, with_inputs
from ntk_explain.options import OPTIMIZERS, InputSpec, Resources, TrainSpec
from ntk_explain.stages.execution import Execution

Optimizer = _choices("Optimizer", OPTIMIZERS)


def _describe(summary: dict) -> None:
    typer.echo(
        f"wrote {summary['out']} and {summary['trajectory']}: {summary['steps']} steps, final loss "
        f"{summary['final_loss']:.4f}, train accuracy {summary['train_accuracy']:.3f} in {summary['seconds']:.1f}s"
    )


@app.command()
@reported
@with_execution
@with_inputs
@with_budget
def train(
    out: Annotated[Path, typer.Option(help="The trained weights (.safetensors) to write.")],
    trajectory: Annotated[Path, typer.Option(help="The trajectory file (HDF5) to record.")],
    inputs: InputSpec,
    resources: Resources,
    how: Execution,
    output: Output,
    optimizer: Annotated[Optimizer, typer.Option(help="torch.optim.SGD, Adam or AdamW.")] = "sgd",
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 0.05,
    momentum: Annotated[float, typer.Option(help="SGD's momentum.")] = 0.0,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (AdamW: decoupled).")] = 0.0,
    epochs: Annotated[int, typer.Option(help="Passes over the training set.", min=1)] = 2,
    batch_size: Annotated[int, typer.Option(help="Training points per step.", min=1)] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the shuffling.", min=0)] = 0,
) -> None:
    """Train a model in eval() mode with a plain recipe, recording its trajectory for path-kernel."""
    recipe = TrainSpec(Optimizer(optimizer).value, lr, momentum, weight_decay, epochs, batch_size, seed)
    from ntk_explain.stages.train import train as run_train  # after the options are checked: it loads torch

    with progress_bar(output.quiet) as progress:
        summary = run_train(inputs, recipe, out, trajectory, resources, replace(how, progress=progress))
    report(summary, output, _describe)
