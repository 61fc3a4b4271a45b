"""`ntk-explain demo`: train the zoo CNN on the built-in digits, compute its eNTK and explain its predictions."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from ntk_explain.cli.app import Output, app, progress_bar, reported, stderr, stdout
from ntk_explain.cli.compute import report_compute
from ntk_explain.cli.options import Device, ProjectionKind, Seed, split_list
from ntk_explain.options import KERNELS, AttributeSpec, InputSpec, KernelSpec, Resources


@app.command()
@reported
def demo(
    output: Output,
    out: Annotated[Path, typer.Option(help="The run file to write; the weights go beside it.")] = Path("runs/demo.h5"),
    kernel: Annotated[str, typer.Option(help="Comma-separated kernels.")] = "trace,pseudo,ck",
    projection: Annotated[ProjectionKind, typer.Option(help="Random projection of the gradients.")] = "none",
    epochs: Annotated[int, typer.Option(help="Training epochs.", min=1)] = 30,
    device: Device = "auto",
    seed: Seed = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace existing demo files.")] = False,
) -> None:
    """Train the zoo CNN on the built-in digits, compute its eNTK, and explain its test predictions."""
    import torch
    from safetensors.torch import save_file

    from ntk_explain import store
    from ntk_explain.cli.render import metrics_table, proponents_table
    from ntk_explain.loading import zoo
    from ntk_explain.loading.adapter import ModelAdapter
    from ntk_explain.loading.data import load_dataset
    from ntk_explain.stages.attribute import attribute
    from ntk_explain.stages.compute import compute
    from ntk_explain.stages.execution import Execution

    weights = out.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in (out, weights):
        store.check_target(path, overwrite=overwrite)
    kernels = [
        KernelSpec(k, ProjectionKind(projection).value, None, seed) for k in split_list(kernel, "--kernel", KERNELS)
    ]
    train, test = load_dataset("zoo:digits", "train"), load_dataset("zoo:digits", "test")
    torch.manual_seed(seed)
    began = time.perf_counter()
    model = zoo.train_classifier(zoo.make_cnn(), train.x, train.y, epochs=epochs, seed=seed)
    trained = time.perf_counter() - began
    with torch.no_grad():
        accuracy = (ModelAdapter(model)(test.inputs).argmax(1) == test.y).double().mean().item()
    save_file(model.state_dict(), str(weights))
    if not output.quiet and not output.as_json:
        message = f"trained zoo:cnn on zoo:digits in {trained:.1f}s: test accuracy {accuracy:.3f}; weights in {weights}"
        stderr.print(message, highlight=False, soft_wrap=True)
    inputs, resources = InputSpec("zoo:cnn", "zoo:digits", "zoo:digits", str(weights)), Resources(device)
    with progress_bar(output.quiet) as progress:
        summary = compute(inputs, kernels, out, resources, Execution(overwrite=overwrite, progress=progress))
    summary.update(weights=str(weights), test_accuracy=round(accuracy, 4), train_seconds=round(trained, 2))
    report_compute(summary, Output(quiet=output.quiet or output.as_json))
    with progress_bar(output.quiet) as progress:
        summary["attribution"] = attribute(out, AttributeSpec("trace"), resources, Execution(progress=progress))
    if output.as_json:
        typer.echo(json.dumps(summary, default=str))
    elif not output.quiet:
        stdout.print(metrics_table(summary["attribution"]["faithfulness"]))
        stdout.print(proponents_table(out, rows=3, top=3))
