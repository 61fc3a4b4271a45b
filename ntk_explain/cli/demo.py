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
    path_points: Annotated[
        int, typer.Option(help="Test points the path-kernel section explains exactly (0: skip it).", min=0)
    ] = 16,
) -> None:
    """Train the zoo CNN on the built-in digits, compute its eNTK, explain its test predictions; then explain some
    exactly by the path kernel of a recorded SGD training, beside that network's kGLM."""
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
    path_files = _path_files(out) if path_points else {}
    for path in (out, weights, *path_files.values()):
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
    if not output.as_json and not output.quiet:
        stdout.print(metrics_table(summary["attribution"]["faithfulness"]))
        stdout.print(proponents_table(out, rows=3, top=3))
    if path_points:
        summary["path"] = _path_section(path_files, path_points, device, seed, overwrite, output)
    if output.as_json:
        typer.echo(json.dumps(summary, default=str))


def _path_files(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("")
    return {
        "weights": Path(f"{stem}-sgd.safetensors"),
        "trajectory": Path(f"{stem}-sgd.traj.h5"),
        "run": Path(f"{stem}-path.h5"),
    }


def _path_section(files: dict[str, Path], points: int, device: str, seed: int, overwrite: bool, output: Output) -> dict:
    """The zoo CNN trained 2 epochs with SGD and momentum 0.9 in float64, its trajectory recorded; its trace eNTK and
    kGLM explanation and its exact path kernel on the first `points` test points, in one run file."""
    from ntk_explain.cli.render import path_table
    from ntk_explain.options import PathSpec, TrainSpec
    from ntk_explain.stages.attribute import attribute
    from ntk_explain.stages.compute import compute
    from ntk_explain.stages.execution import Execution
    from ntk_explain.stages.path_kernel import path_kernel
    from ntk_explain.stages.train import train

    resources, how = Resources(device), Execution(overwrite=overwrite)
    recipe = TrainSpec("sgd", lr=0.05, momentum=0.9, epochs=2, batch_size=64, seed=seed)
    start = InputSpec("zoo:cnn", "zoo:digits", dtype="float64")
    trained = train(start, recipe, files["weights"], files["trajectory"], resources, how)
    inputs = InputSpec("zoo:cnn", "zoo:digits", "zoo:digits", str(files["weights"]), n_test=points, dtype="float64")
    with progress_bar(output.quiet) as progress:
        compute(
            inputs, [KernelSpec("trace")], files["run"], resources, Execution(overwrite=overwrite, progress=progress)
        )
        attribute(files["run"], AttributeSpec("trace"), resources, Execution(progress=progress))
        spec = PathSpec(str(files["trajectory"]))
        exact = path_kernel(inputs, spec, files["run"], resources, Execution(progress=progress), into=True)
    if not output.quiet and not output.as_json:
        stderr.print(
            f"trained zoo:cnn with SGD + momentum in float64 ({trained['steps']} steps, trajectory in "
            f"{files['trajectory']}); path kernel of {points} test points in {exact['seconds']:.1f}s "
            f"into {files['run']}",
            highlight=False,
            soft_wrap=True,
        )
        stdout.print(path_table(exact))
    return {"train": trained, "path_kernel": exact}
