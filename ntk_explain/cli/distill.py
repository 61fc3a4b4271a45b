"""`ntk-explain distill`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer

from ntk_explain import store
from ntk_explain.cli.app import app, progress_bar, reported
from ntk_explain.cli.options import (
    SEED_MAX,
    BatchSize,
    Debug,
    Device,
    DType,
    Json,
    MaxMemory,
    Method,
    OutputKey,
    ProjectionKind,
    Quiet,
    Selection,
    Target,
    XKey,
)
from ntk_explain.errors import UsageError
from ntk_explain.options import DEFAULT_REDUCTION, DistillSpec, KernelSpec, KipSettings
from ntk_explain.stages import distributed
from ntk_explain.stages.distill import distill_support, distill_target, export_support
from ntk_explain.stages.inputs import load_inputs


@app.command()
@reported
def distill(
    model: Annotated[str, typer.Option(help="pkg.module:factory, zoo:NAME (mlp, cnn) or a torch.export .pt2 file.")],
    train: Annotated[str, typer.Option(help="Training data to distil: .npz, .safetensors, .h5 or zoo:digits.")],
    out: Annotated[Path, typer.Option(help="The run file: new, or one of the same data (e.g. from compute).")],
    test: Annotated[str | None, typer.Option(help="Data to explain with the support (rows of test_train).")] = None,
    weights: Annotated[str | None, typer.Option(help=".safetensors, or .pt/.pth (loaded weights_only).")] = None,
    model_kwargs: Annotated[str | None, typer.Option(help="JSON object of factory arguments.")] = None,
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
    x_key: XKey = "x",
    y_key: Annotated[str, typer.Option(help="Name of the label array in data files.")] = "y",
    output_key: OutputKey = None,
    n_train: Annotated[int | None, typer.Option(help="Use only the first N training points.", min=1)] = None,
    n_test: Annotated[int | None, typer.Option(help="Use only the first M test points.", min=1)] = None,
    device: Device = "auto",
    dtype: Annotated[DType, typer.Option(help="Computation and storage precision.")] = DType.float32,
    batch_size: BatchSize = "auto",
    max_memory: MaxMemory = None,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the projection, the selection and kip.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing /distill in --out, and --export.")] = False,
    quiet: Quiet = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Distil the training set into m ≪ N support points (the distilled NTK); write their kernel with the test set."""
    if distributed.from_environment().rank > 0:
        return  # under torchrun, rank 0 distils and writes; distillation is not sharded
    if reduction is not None and per_class is not None:
        raise UsageError("give --reduction or --per-class, not both")
    if kernel not in ("pseudo", "trace"):
        raise UsageError(f"--kernel {kernel!r}: distil a pseudo or trace kernel")
    if ProjectionKind(projection).value == "none":
        raise UsageError("--projection none: distillation works on projected features; choose a projection")
    if export is not None:
        store.check_target(export, overwrite=overwrite)
    spec = KernelSpec(kernel, ProjectionKind(projection).value, proj_dim, seed)
    plan = DistillSpec(
        Method(method).value,
        Selection(select).value,
        (reduction or DEFAULT_REDUCTION) if per_class is None else None,
        per_class,
        Target(target).value,
        KipSettings(steps, lr, reg, kip_batch, learn_labels),
        seed=seed,
    )
    options = {"kernel": [spec.name], "projection": spec.projection, "proj_dim": spec.proj_dim}
    options["distill"] = plan.options()
    inputs = load_inputs(
        model=model,
        train=train,
        test=test,
        weights=weights,
        model_kwargs=model_kwargs,
        x_key=x_key,
        y_key=y_key,
        output_key=output_key,
        n_train=n_train,
        n_test=n_test,
        device=device,
        dtype=DType(dtype).value,
        batch_size=batch_size,
        max_memory=max_memory,
        seed=seed,
        options=options,
    )
    train_data = inputs.data["train"]
    with progress_bar(quiet) as progress, distill_target(out, inputs, overwrite) as run:
        logits = torch.from_numpy(run["data/train/nn_logits"][()])
        test_x = inputs.data["test"].inputs if "test" in inputs.data else None
        summary = distill_support(run, inputs.net, spec, plan, train_data, logits, test_x, inputs.budget, progress)
        store.set_attrs(run["distill"], {key: inputs.attrs[key] for key in ("command", "params", "created")})
    if export is not None:
        export_support(out, export)
    summary = {"out": str(out), **summary}
    if as_json:
        typer.echo(json.dumps(summary, default=str))
    elif not quiet:
        typer.echo(
            f"wrote {out}: {summary['method']} support of {summary['m']} points for {summary['n_train']} "
            f"({summary['reduction']:.1f}× fewer), {summary['jacobians']} Jacobians in {summary['seconds']:.1f}s"
        )
