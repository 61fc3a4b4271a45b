"""The command line's options, declared once: their types, and decorators that give a command the options of the
model and its data (`with_inputs`: an `InputSpec`) and of the device and memory (`with_resources`: `Resources`).
Nothing heavy is imported here, so that `--help` and usage errors answer at once."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any

import typer

from ntk_explain.errors import UsageError
from ntk_explain.options import (
    DTYPES,
    FEATURE_DTYPES,
    FIT_ON,
    METHODS,
    NORMALIZATIONS,
    PROJECTIONS,
    SEED_MAX,
    SELECTIONS,
    SURROGATES,
    TARGETS,
    InputSpec,
    Resources,
)


def _choices(name: str, values: tuple | dict) -> type[Enum]:
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


ProjectionKind = _choices("ProjectionKind", PROJECTIONS)
FeatureDType = _choices("FeatureDType", FEATURE_DTYPES)
DType = _choices("DType", DTYPES)
Surrogate = _choices("Surrogate", SURROGATES)
Target = _choices("Target", TARGETS)
Normalize = _choices("Normalize", NORMALIZATIONS)
FitOn = _choices("FitOn", FIT_ON)
ClassWeight = _choices("ClassWeight", ("none", "balanced"))
Method = _choices("Method", METHODS)
Selection = _choices("Selection", SELECTIONS)

Debug = Annotated[bool, typer.Option("--debug", help="Show the traceback of a failure.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, messages or warnings.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON summary object on stdout.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:i.")]
MaxMemory = Annotated[str | None, typer.Option(help="Memory budget, e.g. 2GB (default: half the free memory).")]
Seed = Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the random projection (and sampling).")]
Overwrite = Annotated[bool, typer.Option(help="Replace what exists: the output file, or the groups this writes.")]
Resume = Annotated[bool, typer.Option(help="Continue the partial run that an interrupted or killed run left.")]

_INPUTS: dict[str, tuple[Any, Any]] = {
    "model": (
        Annotated[
            str, typer.Option(help="pkg.module:factory, zoo:NAME (mlp, cnn), hf:DIR or a torch.export .pt2 file.")
        ],
        inspect.Parameter.empty,
    ),
    "train": (
        Annotated[str, typer.Option(help="Training data: .npz, .safetensors, .h5 (arrays x, y) or zoo:digits.")],
        inspect.Parameter.empty,
    ),
    "test": (Annotated[str | None, typer.Option(help="Data to explain (rows of test_train).")], None),
    "weights": (Annotated[str | None, typer.Option(help=".safetensors, or .pt/.pth (loaded weights_only).")], None),
    "model_kwargs": (Annotated[str | None, typer.Option(help="JSON object of factory arguments.")], None),
    "x_key": (
        Annotated[str, typer.Option(help="Input array(s) in data files; several (a,b) go to the model by keyword.")],
        "x",
    ),
    "y_key": (Annotated[str, typer.Option(help="Name of the label array in data files.")], "y"),
    "output_key": (
        Annotated[str | None, typer.Option(help="The logits' entry in a dict or object output (default: logits).")],
        None,
    ),
    "n_train": (Annotated[int | None, typer.Option(help="Use only the first N training points.", min=1)], None),
    "n_test": (Annotated[int | None, typer.Option(help="Use only the first M test points.", min=1)], None),
    "dtype": (Annotated[DType, typer.Option(help="Computation and storage precision.")], "float32"),
}
_RESOURCES: dict[str, tuple[Any, Any]] = {
    "device": (Device, "auto"),
    "max_memory": (MaxMemory, None),
    "batch_size": (
        Annotated[str, typer.Option(help="Samples per forward/backward pass, or auto: a whole tile of the budget.")],
        "auto",
    ),
    "tile": (
        Annotated[int | None, typer.Option(help="Rows per kernel tile (default: from --max-memory).", min=1)],
        None,
    ),
}


def split_list(text: str, option: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """A comma-separated option as its items, each once, in order (within `allowed` when given)."""
    items = tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    bad = [item for item in items if allowed is not None and item not in allowed]
    if not items or bad:
        raise UsageError(f"{option} {text!r}: expected a comma-separated list of {', '.join(allowed or ('names',))}")
    return items


def json_object(text: str | None, option: str) -> dict:
    """A JSON object option (empty when not given)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{option} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise UsageError(f"{option} must be a JSON object")
    return value


def batch_size(text: str) -> int | None:
    """--batch-size: a positive number of samples, or auto (None)."""
    if text == "auto":
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UsageError(f"--batch-size {text!r}: expected a positive integer or auto")
    return int(text)


def _inputs(values: dict) -> InputSpec:
    values.update(
        model_kwargs=json_object(values["model_kwargs"], "--model-kwargs"),
        x_key=split_list(values["x_key"], "--x-key"),
        dtype=DType(values["dtype"]).value,
    )
    return InputSpec(**values)


def _resources(values: dict) -> Resources:
    return Resources(values["device"], values["max_memory"], batch_size(values["batch_size"]), values["tile"])


def gathered(options: dict[str, tuple[Any, Any]], name: str, build: Callable[[dict], object]) -> Callable:
    """A decorator adding `options` (name → (annotation, default)) to a command's signature, the command receiving
    them as one argument `name`, built by `build` from their values."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        keyword = inspect.Parameter.KEYWORD_ONLY  # Typer passes every parameter by name
        own = [p.replace(kind=keyword) for p in signature.parameters.values() if p.name != name]
        added = [inspect.Parameter(key, keyword, default=d, annotation=a) for key, (a, d) in options.items()]
        required = [p for p in added if p.default is inspect.Parameter.empty]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {key: kwargs.pop(key) for key in options}
            return command(**kwargs, **{name: build(values)})

        run.__signature__ = signature.replace(parameters=[*required, *own, *(p for p in added if p not in required)])
        run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
        return run

    return decorate


with_inputs = gathered(_INPUTS, "inputs", _inputs)
with_resources = gathered(_RESOURCES, "resources", _resources)
with_budget = gathered(
    {key: _RESOURCES[key] for key in ("device", "max_memory")}, "resources", lambda v: Resources(**v)
)
with_execution = gathered(
    {"overwrite": (Overwrite, False), "resume": (Resume, False)}, "how", lambda v: _execution(**v)
)


def _execution(overwrite: bool, resume: bool) -> Any:
    from ntk_explain.stages.execution import Execution

    return Execution(overwrite, resume)
