"""`ntk-explain compute`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ntk_explain.cli.app import app, progress_bar, reported
from ntk_explain.cli.options import (
    SEED_MAX,
    BatchSize,
    Debug,
    Device,
    DType,
    FeatureDType,
    Json,
    MaxMemory,
    OutputKey,
    ProjectionKind,
    Quiet,
    XKey,
)
from ntk_explain.options import KERNELS
from ntk_explain.stages import distributed
from ntk_explain.stages.compute import run_compute


def report_compute(summary: dict, as_json: bool, quiet: bool) -> None:
    """The summary of compute, from rank 0 alone under torchrun."""
    if summary.get("rank", 0) > 0:
        return
    if as_json:
        typer.echo(json.dumps(summary, default=str))
    elif not quiet:
        kernels = ", ".join(summary["kernels"])
        typer.echo(
            f"wrote {summary['out']}: {kernels} for {summary['n_train']} train"
            f"{' and ' + str(summary['n_test']) + ' test' if 'n_test' in summary else ''} points"
            f" in {summary['seconds']:.1f}s"
        )


@app.command()
@reported
def compute(
    model: Annotated[str, typer.Option(help="pkg.module:factory, zoo:NAME (mlp, cnn) or a torch.export .pt2 file.")],
    train: Annotated[str, typer.Option(help="Training data: .npz, .safetensors, .h5 (arrays x, y) or zoo:digits.")],
    out: Annotated[Path, typer.Option(help="The run file (HDF5) to write.")],
    test: Annotated[str | None, typer.Option(help="Data to explain (rows of test_train).")] = None,
    weights: Annotated[str | None, typer.Option(help=".safetensors, or .pt/.pth (loaded weights_only).")] = None,
    model_kwargs: Annotated[str | None, typer.Option(help="JSON object of factory arguments.")] = None,
    kernel: Annotated[str, typer.Option(help=f"Comma-separated kernels: {', '.join(KERNELS)}.")] = "trace",
    projection: Annotated[ProjectionKind, typer.Option(help="Random projection of the gradients.")] = "none",
    proj_dim: Annotated[int | None, typer.Option(help="Projection dimension (default 10240; pseudo 4096).")] = None,
    feature_dtype: Annotated[
        FeatureDType | None, typer.Option(help="Storage of projected features (default: the --dtype).")
    ] = None,
    params: Annotated[str | None, typer.Option(help="Parameter globs, e.g. 'fc.*' (default: all).")] = None,
    x_key: XKey = "x",
    y_key: Annotated[str, typer.Option(help="Name of the label array in data files.")] = "y",
    output_key: OutputKey = None,
    n_train: Annotated[int | None, typer.Option(help="Use only the first N training points.", min=1)] = None,
    n_test: Annotated[int | None, typer.Option(help="Use only the first M test points.", min=1)] = None,
    device: Device = "auto",
    dtype: Annotated[DType, typer.Option(help="Computation and storage precision.")] = DType.float32,
    batch_size: BatchSize = "auto",
    max_memory: MaxMemory = None,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the random projection.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue the partial run that an interrupted or killed compute of --out left.")
    ] = False,
    quiet: Quiet = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Compute eNTK kernels (train×train, test×train and self-kernel diagonals) into a run file."""
    with progress_bar(quiet or distributed.from_environment().rank > 0) as progress:
        summary = run_compute(
            model=model,
            train=train,
            out=out,
            test=test,
            weights=weights,
            model_kwargs=model_kwargs,
            kernel=kernel,
            projection=ProjectionKind(projection).value,
            proj_dim=proj_dim,
            feature_dtype=FeatureDType(feature_dtype).value if feature_dtype else None,
            params=params,
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
            overwrite=overwrite,
            resume=resume,
            progress=progress,
        )
    report_compute(summary, as_json, quiet)
