"""The `ntk-explain` command line: parses options, calls the library, reports (SPEC §7)."""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import h5py
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.torch import save_file

from ntk_explain import distributed, store, zoo
from ntk_explain.adapter import ModelAdapter
from ntk_explain.distillation import DISTILL_METRICS, KIP, METHODS, SELECTIONS
from ntk_explain.errors import BadInputError, NtkExplainError, OutOfMemoryError, UsageError
from ntk_explain.kernels import KERNELS
from ntk_explain.loading import Dataset, check_model_on_data, input_keys, load_dataset, load_model
from ntk_explain.metrics import METRIC_NAMES
from ntk_explain.pipeline import (
    DEFAULT_REDUCTION,
    FEATURE_DTYPES,
    NORMALIZATIONS,
    Budget,
    DistillSpec,
    KernelSpec,
    SurrogateSpec,
    attribute_run,
    compute_kernel,
    distill_support,
    network_logits,
    write_data,
)
from ntk_explain.projections import PROJECTIONS
from ntk_explain.resources import memory_budget, resolve_device, retain_freed_memory
from ntk_explain.surrogate import SURROGATES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Explain trained PyTorch networks through their empirical neural tangent kernel.",
)
stderr = Console(stderr=True)
stdout = Console(width=None if sys.stdout.isatty() else 160)  # piped tables keep whole lines

SEED_MAX = 2**63 - 1  # seeds are stored as HDF5 int64 attributes

Projection = Enum("Projection", {p: p for p in PROJECTIONS}, type=str)  # type: ignore[misc]


FeatureDType = Enum("FeatureDType", {name: name for name in FEATURE_DTYPES}, type=str)  # type: ignore[misc]


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


Debug = Annotated[bool, typer.Option("--debug", help="Show the traceback of a failure.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON summary object on stdout.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:i.")]
BatchSize = Annotated[
    str, typer.Option(help="Most rows per tile, or auto: from the memory budget, halved on out-of-memory.")
]
MaxMemory = Annotated[str | None, typer.Option(help="Memory budget, e.g. 2GB (default: half the free memory).")]
XKey = Annotated[
    str,
    typer.Option(help="Input array(s) in data files; several (input_ids,attention_mask) go to the model by keyword."),
]
OutputKey = Annotated[
    str | None, typer.Option(help="The logits' entry in a dict or object output (default: logits, or the output).")
]


def reported(command: Callable) -> Callable:
    """Turn expected failures into one stderr line and the exit codes of SPEC §7; --quiet silences warnings."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                if kwargs.get("quiet"):  # torch's warnings that our calls trigger, too
                    warnings.simplefilter("ignore")
                return command(*args, **kwargs)
        except Exception as error:
            if kwargs.get("debug"):
                raise
            raise typer.Exit(_exit_code(error)) from None
        except KeyboardInterrupt as interrupt:
            stderr.print(f"interrupted{f': {interrupt}' if str(interrupt) else ''}", style="red", highlight=False)
            raise typer.Exit(130) from None

    return run


def _exit_code(error: Exception) -> int:
    if isinstance(error, NtkExplainError):
        message, code = str(error), error.exit_code
    elif isinstance(error, torch.OutOfMemoryError | MemoryError):
        message, code = "out of memory: lower --max-memory or --batch-size", OutOfMemoryError.exit_code
    else:
        message, code = f"unexpected failure: {type(error).__name__}: {error} (rerun with --debug)", 1
    first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    stderr.print(f"error: {first_line}", style="red", highlight=False, markup=False, soft_wrap=True)
    return code


class RichProgress:
    """The library's Progress as a rich bar on stderr."""

    def __init__(self, bar: Progress) -> None:
        self.bar, self.task = bar, None

    def start(self, description: str, total: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=self.bar.tasks[self.task].total)
        self.task = self.bar.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        self.bar.advance(self.task, steps)


def _progress_bar(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        disable=quiet or not sys.stderr.isatty(),
        transient=False,
    )


def _split_list(text: str | None, option: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
    if text is None:
        return None
    items = tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))  # once each, in order
    bad = [item for item in items if allowed is not None and item not in allowed]
    if not items or bad:
        raise UsageError(f"{option} {text!r}: expected a comma-separated list of {', '.join(allowed or ('globs',))}")
    return items


def _json_object(text: str | None, option: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{option} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise UsageError(f"{option} must be a JSON object")
    return value


@dataclass
class Inputs:
    """A loaded model and data sets on their device, with the options and provenance of the run."""

    net: ModelAdapter
    data: dict[str, Dataset]
    budget: Budget
    classes: int
    options: dict
    attrs: dict


def _batch_size(text: str | None) -> int | None:
    """--batch-size: a positive number of rows, or auto (None: from the memory budget, halved on out-of-memory)."""
    if text is None or text == "auto":
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UsageError(f"--batch-size {text!r}: expected a positive integer or auto")
    return int(text)


def load_inputs(
    *,
    model: str,
    train: str,
    test: str | None,
    weights: str | None,
    model_kwargs: str | None,
    x_key: str,
    y_key: str,
    output_key: str | None,
    n_train: int | None,
    n_test: int | None,
    device: str,
    dtype: str,
    batch_size: str | None,
    max_memory: str | None,
    seed: int,
    options: dict,
) -> Inputs:
    """Validate the options shared by compute and distill, load the model and the data; `options` are recorded too."""
    torch_device = distributed.local_device(resolve_device(device), distributed.from_environment())
    torch_dtype = getattr(torch, dtype)
    budget = Budget(torch_device, memory_budget(torch_device, max_memory), _batch_size(batch_size))
    kwargs = _json_object(model_kwargs, "--model-kwargs")
    keys = input_keys(x_key)
    if output_key is not None and not output_key.strip():
        raise UsageError("--output-key must name an entry of the model's output")
    loaded = load_model(model, kwargs, weights)
    net = ModelAdapter(loaded.module.to(device=torch_device, dtype=torch_dtype).eval(), output_key)
    data = {"train": load_dataset(train, "train", x_key=keys, y_key=y_key, dtype=torch_dtype, limit=n_train)}
    if test:
        data["test"] = load_dataset(test, "test", x_key=keys, y_key=y_key, dtype=torch_dtype, limit=n_test)
    classes = max(check_model_on_data(net, d) for d in data.values())
    options = {
        "model": model,
        "model_kwargs": kwargs,
        "weights": weights,
        "train": train,
        "test": test,
        "x_key": list(keys),
        "output_key": output_key,
        **options,
        "device": str(torch_device),
        "dtype": dtype,
        "batch_size": budget.batch_size or "auto",
        "max_memory": budget.bytes,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
    }
    attrs = store.provenance(
        sys.argv,
        options,
        str(torch_device),
        seed,
        loaded.model_sha256,
        loaded.weights_sha256,
        {split: d.sha256 for split, d in data.items()},
    )
    return Inputs(net, data, budget, classes, options, attrs)


def run_compute(
    *,
    model: str,
    train: str,
    out: Path,
    test: str | None = None,
    weights: str | None = None,
    model_kwargs: str | None = None,
    kernel: str = "trace",
    projection: str = "none",
    proj_dim: int | None = None,
    feature_dtype: str | None = None,
    params: str | None = None,
    x_key: str = "x",
    y_key: str = "y",
    output_key: str | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: str | None = None,
    max_memory: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
) -> dict:
    """Load, validate, and write the run file with every requested kernel; returns a summary.

    An interrupt keeps the partial run file; `resume` continues it (same options; the memory budget and batch size
    it recorded stand in for defaults, so its tiles, and therefore its numbers, stay the same)."""
    store.check_target(out, overwrite=overwrite)
    shard = distributed.from_environment()
    written = out if shard.world == 1 else store.shard_path(out, shard.rank, shard.world)
    recorded = store.partial_params(written) if resume else None
    if recorded:
        max_memory = max_memory or str(recorded["max_memory"])
        batch_size = str(recorded["batch_size"]) if batch_size in (None, "auto") else batch_size
    kernels = _split_list(kernel, "--kernel", KERNELS)
    globs = _split_list(params, "--params")
    if proj_dim is not None and proj_dim < 1:
        raise UsageError("--proj-dim must be positive")
    options = {
        "kernel": list(kernels),
        "projection": projection,
        "proj_dim": proj_dim,
        "feature_dtype": feature_dtype,
        "params": list(globs or ["*"]),
    }
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
        dtype=dtype,
        batch_size=batch_size,
        max_memory=max_memory,
        seed=seed,
        options=options,
    )
    data, budget = inputs.data, replace(inputs.budget, shard=shard)
    specs = [KernelSpec(k, projection, proj_dim, seed, globs, feature_dtype) for k in kernels]
    started = time.perf_counter()
    summary: dict = {"out": str(out), "device": str(budget.device), "classes": inputs.classes, "kernels": {}}
    target = store.create_run(
        written, overwrite=overwrite or shard.world > 1, attrs=inputs.attrs, resumable=True, resume=resume
    )
    if shard.world > 1:
        summary.update(rank=shard.rank, world_size=shard.world)
        distributed.start(shard, budget.device)
    try:
        with _progress_bar(quiet or shard.rank > 0) as bar, target as run:
            summary["resumed"] = int(run.attrs.get("resumed", 0))
            progress = RichProgress(bar)
            for split, dataset in data.items():
                write_data(run, split, dataset, network_logits(inputs.net, dataset.inputs, budget))
                summary[f"n_{split}"] = len(dataset.inputs)
            for spec in specs:
                began = time.perf_counter()
                test_x = data["test"].inputs if "test" in data else None
                kernel_attrs = compute_kernel(run, inputs.net, spec, data["train"].inputs, test_x, budget, progress)
                summary["kernels"][spec.name] = {**kernel_attrs, "seconds": round(time.perf_counter() - began, 3)}
        if shard.world > 1:
            distributed.barrier(shard)
            if shard.rank == 0:
                shards = [store.shard_path(out, rank, shard.world) for rank in range(shard.world)]
                store.join_shards(out, shards, overwrite=overwrite)
            distributed.barrier(shard)
    except KeyboardInterrupt:
        raise _kept(written) from None
    finally:
        distributed.stop(shard)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _report(summary: dict, as_json: bool, quiet: bool) -> None:
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
    projection: Annotated[Projection, typer.Option(help="Random projection of the gradients.")] = "none",
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
    summary = run_compute(
        model=model,
        train=train,
        out=out,
        test=test,
        weights=weights,
        model_kwargs=model_kwargs,
        kernel=kernel,
        projection=Projection(projection).value,
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
        quiet=quiet,
    )
    _report(summary, as_json, quiet)


@app.command()
@reported
def info(
    run: Annotated[Path, typer.Argument(help="A run file written by ntk-explain.")],
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Show what a run file holds: provenance, groups and datasets."""
    if as_json:
        typer.echo(json.dumps({"attrs": store.root_attrs(run), "items": store.summarize(run)}, default=str))
    else:
        stdout.print(store.info_table(run))
        distilled = store.distill_table(run)
        if distilled is not None:
            stdout.print(distilled)


Surrogate = Enum("Surrogate", {name: name for name in SURROGATES}, type=str)  # type: ignore[misc]


class Target(str, Enum):
    model = "model"
    labels = "labels"


Normalize = Enum("Normalize", {name: name for name in NORMALIZATIONS}, type=str)  # type: ignore[misc]


class FitOn(str, Enum):
    support = "support"
    train = "train"


class ClassWeight(str, Enum):
    none = "none"
    balanced = "balanced"


def run_attribute(
    run: Path,
    *,
    kernel: str | None = None,
    surrogate: str = "kglm",
    target: str = "model",
    alpha: float = 1e-4,
    normalize: str = "cosine",
    class_weight: str = "none",
    fit_on: str = "support",
    top_k: int = 10,
    all_classes: bool = False,
    device: str = "auto",
    max_memory: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
) -> dict:
    """Fit the surrogate on a run file's kernel and add attribution and faithfulness to it. An interrupt keeps the
    partial copy of the run file; `resume` continues it."""
    if not alpha > 0:
        raise UsageError("--alpha must be positive")
    torch_device = resolve_device(device)
    budget = Budget(torch_device, memory_budget(torch_device, max_memory))
    spec = SurrogateSpec(surrogate, alpha, target, normalize, class_weight == "balanced", fit_on)
    try:
        with _progress_bar(quiet) as bar:
            return attribute_run(
                str(run),
                kernel,
                spec,
                budget,
                top_k=top_k,
                all_classes=all_classes,
                overwrite=overwrite,
                resume=resume,
                progress=RichProgress(bar),
            )
    except KeyboardInterrupt:
        raise _kept(run) from None


def _kept(path: Path) -> KeyboardInterrupt:
    """The interrupt of a resumable command, naming the partial file it keeps (if it got as far as making one)."""
    partial = store.partial_path(path)
    return KeyboardInterrupt(f"the partial run is kept in {partial}; --resume continues it" if partial.exists() else "")


def _metrics_table(metrics: dict, distilled: dict | None = None) -> Table:
    """The faithfulness metrics; beside them those of the surrogate on the distilled support, when given."""
    columns = {
        "value" if distilled is None else "full data": metrics,
        **({"distilled": distilled} if distilled else {}),
    }
    table = Table(title="faithfulness", title_justify="left")
    table.add_column("metric")
    for label in columns:
        table.add_column(label, justify="right")
    keys = [key for key in (*METRIC_NAMES, *DISTILL_METRICS) if any(key in c for c in columns.values())]
    for key in keys:
        cells = [c.get(key, "") for c in columns.values()]
        table.add_row(key, *(f"{v:.4f}" if isinstance(v, float) else str(v) for v in cells))
    return table


@app.command()
@reported
def attribute(
    run: Annotated[Path, typer.Argument(help="A run file written by compute.")],
    kernel: Annotated[str | None, typer.Option(help="Kernel group (default: trace, or the only one).")] = None,
    surrogate: Annotated[
        Surrogate, typer.Option(help="kglm: kernel logistic regression; ridge: of the logits.")
    ] = Surrogate.kglm,
    target: Annotated[
        Target, typer.Option(help="kGLM targets: the network's predictions or the labels.")
    ] = Target.model,
    alpha: Annotated[float, typer.Option(help="L2 penalty α of mean loss + α‖W‖² (ridge: λ = αN).")] = 1e-4,
    normalize: Annotated[
        Normalize, typer.Option(help="cosine; scale: by the mean training self-kernel; none: raw.")
    ] = "cosine",
    class_weight: Annotated[ClassWeight, typer.Option(help="Weigh classes by inverse frequency.")] = ClassWeight.none,
    fit_on: Annotated[
        FitOn, typer.Option(help="--kernel distilled: fit on the support's labels, or on the N training points.")
    ] = FitOn.support,
    top_k: Annotated[int, typer.Option(help="Proponents and opponents kept per point.", min=1)] = 10,
    all_classes: Annotated[bool, typer.Option(help="Also store (M, N, C) scores for every class.")] = False,
    device: Device = "auto",
    max_memory: MaxMemory = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing surrogate and attribution groups.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue the partial run that an interrupted or killed attribute of RUN left.")
    ] = False,
    quiet: Quiet = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Fit a kernel surrogate, write data-attribution scores and faithfulness metrics into the run file."""
    if distributed.from_environment().rank > 0:
        return  # under torchrun, rank 0 fits and writes; the fit is not sharded
    summary = run_attribute(
        run,
        kernel=kernel,
        surrogate=Surrogate(surrogate).value,
        target=Target(target).value,
        alpha=alpha,
        normalize=Normalize(normalize).value,
        class_weight=ClassWeight(class_weight).value,
        fit_on=FitOn(fit_on).value,
        top_k=top_k,
        all_classes=all_classes,
        device=device,
        max_memory=max_memory,
        overwrite=overwrite,
        resume=resume,
        quiet=quiet,
    )
    if as_json:
        typer.echo(json.dumps(summary, default=str))
    elif not quiet:
        stdout.print(_metrics_table(summary["faithfulness"]))


@app.command()
@reported
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run file with a fitted surrogate.")],
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Show the surrogate's faithfulness metrics, beside those of the distilled support's surrogate when both exist."""
    found = store.faithfulness(run)
    full, distilled = found.get("faithfulness"), found.get("distill/faithfulness")
    if as_json:
        typer.echo(json.dumps({**(full or {}), **({"distilled": distilled} if distilled else {})}, default=str))
    elif full is None:
        stdout.print(_metrics_table(distilled))
    else:
        stdout.print(_metrics_table(full, distilled))


@app.command()
@reported
def demo(
    out: Annotated[Path, typer.Option(help="The run file to write; the weights go beside it.")] = Path("runs/demo.h5"),
    kernel: Annotated[str, typer.Option(help="Comma-separated kernels.")] = "trace,pseudo,ck",
    projection: Annotated[Projection, typer.Option(help="Random projection of the gradients.")] = "none",
    epochs: Annotated[int, typer.Option(help="Training epochs.", min=1)] = 30,
    device: Device = "auto",
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of training and projection.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace existing demo files.")] = False,
    quiet: Quiet = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Train the zoo CNN on the built-in digits, compute its eNTK, and explain its test predictions."""
    weights = out.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in (out, weights):
        store.check_target(path, overwrite=overwrite)
    train, test = load_dataset("zoo:digits", "train"), load_dataset("zoo:digits", "test")
    torch.manual_seed(seed)
    began = time.perf_counter()
    model = zoo.train_classifier(zoo.make_cnn(), train.x, train.y, epochs=epochs, seed=seed)
    trained = time.perf_counter() - began
    with torch.no_grad():
        accuracy = (model(test.x).argmax(1) == test.y).double().mean().item()
    save_file(model.state_dict(), str(weights))
    if not quiet and not as_json:
        stderr.print(
            f"trained zoo:cnn on zoo:digits in {trained:.1f}s: test accuracy {accuracy:.3f}; weights in {weights}",
            highlight=False,
            soft_wrap=True,
        )
    summary = run_compute(
        model="zoo:cnn",
        weights=str(weights),
        train="zoo:digits",
        test="zoo:digits",
        out=out,
        kernel=kernel,
        projection=Projection(projection).value,
        device=device,
        seed=seed,
        overwrite=overwrite,
        quiet=quiet,
    )
    summary.update(weights=str(weights), test_accuracy=round(accuracy, 4), train_seconds=round(trained, 2))
    _report(summary, False, quiet or as_json)
    explained = run_attribute(out, kernel="trace", device=device, quiet=quiet)
    summary["attribution"] = explained
    if as_json:
        typer.echo(json.dumps(summary, default=str))
    elif not quiet:
        stdout.print(_metrics_table(explained["faithfulness"]))
        stdout.print(_proponents_table(out, rows=3, top=3))


Method = Enum("Method", {m: m for m in METHODS}, type=str)  # type: ignore[misc]
Selection = Enum("Selection", {m: m for m in SELECTIONS}, type=str)  # type: ignore[misc]


@contextmanager
def _distill_target(out: Path, inputs: Inputs, overwrite: bool) -> Iterator[h5py.File]:
    """A new run file, or an existing one of the same data, whose /distill is replaced only with --overwrite."""
    store.check_target(out, overwrite=True)
    if not out.exists():
        with store.create_run(out, overwrite=False, attrs=inputs.attrs) as run:
            for split, dataset in inputs.data.items():
                write_data(run, split, dataset, network_logits(inputs.net, dataset.inputs, inputs.budget))
            yield run
        return
    with store.update_run(out) as (run, _):
        for key in ("model_sha256", "weights_sha256"):
            if run.attrs.get(key) != inputs.attrs[key]:
                raise BadInputError(f"{out} was made with another model or weights; distil into a new --out")
        for split, dataset in inputs.data.items():
            if run.get(f"data/{split}") is None or run[f"data/{split}"].attrs.get("sha256") != dataset.sha256:
                raise BadInputError(f"{out} holds other {split} data; distil into a new --out")
        for name in ("distill", "kernel/distilled"):
            if name in run and not overwrite:
                raise BadInputError(f"{out} already has /{name}; pass --overwrite to replace it")
            if name in run:
                del run[name]
        yield run


def _export_support(run: Path, path: Path) -> None:
    """The support as safetensors: inputs (kip, select), features, labels, classes and source rows."""
    with store.open_run(run) as f:
        group = f["distill"]
        tensors = {
            key: torch.from_numpy(group[key][()]) for key in ("inputs", "labels", "classes", "source") if key in group
        }
        tensors["features"] = torch.from_numpy(f["kernel/distilled/features/train"][()])
    partial = path.with_name(f".{path.name}.partial")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


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
    projection: Annotated[Projection, typer.Option(help="Random projection of the gradients (not none).")] = "sparse",
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
    if Projection(projection).value == "none":
        raise UsageError("--projection none: distillation works on projected features; choose a projection")
    if export is not None:
        store.check_target(export, overwrite=overwrite)
    spec = KernelSpec(kernel, Projection(projection).value, proj_dim, seed)
    plan = DistillSpec(
        Method(method).value,
        Selection(select).value,
        (reduction or DEFAULT_REDUCTION) if per_class is None else None,
        per_class,
        Target(target).value,
        KIP(steps, lr, reg, kip_batch, learn_labels),
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
    with _progress_bar(quiet) as bar, _distill_target(out, inputs, overwrite) as run:
        logits = torch.from_numpy(run["data/train/nn_logits"][()])
        test_x = inputs.data["test"].inputs if "test" in inputs.data else None
        summary = distill_support(
            run, inputs.net, spec, plan, train_data, logits, test_x, inputs.budget, RichProgress(bar)
        )
        store.set_attrs(run["distill"], {key: inputs.attrs[key] for key in ("command", "params", "created")})
    if export is not None:
        _export_support(out, export)
    summary = {"out": str(out), **summary}
    if as_json:
        typer.echo(json.dumps(summary, default=str))
    elif not quiet:
        typer.echo(
            f"wrote {out}: {summary['method']} support of {summary['m']} points for {summary['n_train']} "
            f"({summary['reduction']:.1f}× fewer), {summary['jacobians']} Jacobians in {summary['seconds']:.1f}s"
        )


def _proponents_table(run: Path, rows: int, top: int) -> Table:
    """The strongest training proponents of the first `rows` explained points (rows of the source files)."""
    with store.open_run(run) as f:
        split = "test" if "test" in f["data"] else "train"
        source, labels = f[f"data/{split}/index"][:rows], f[f"data/{split}/labels"][:rows]
        predicted = f["attribution/class"][:rows]
        index, score = f["attribution/topk_index"][:rows, :top], f["attribution/topk_score"][:rows, :top]
        train_source, train_labels = f["data/train/index"][()], f["data/train/labels"][()]
    table = Table(title=f"top-{top} proponents (training points, attribution score)", title_justify="left")
    table.add_column(f"{split} row")
    table.add_column("label")
    table.add_column("network")
    for rank in range(top):
        table.add_column(f"#{rank + 1}")
    for row in range(len(source)):
        cells = [
            f"train row {train_source[j]} (label {train_labels[j]}) {s:+.3f}"
            for j, s in zip(index[row], score[row], strict=True)
        ]
        table.add_row(str(source[row]), str(labels[row]), str(predicted[row]), *cells)
    return table


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: SIGTERM stops like Ctrl-C (exit 130, nothing half-written); freed memory is kept for reuse."""
    signal.signal(signal.SIGTERM, _interrupt)
    retain_freed_memory()
    app()
