"""The command line's option types, declared once for every command."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from ntk_explain.options import FEATURE_DTYPES, METHODS, NORMALIZATIONS, PROJECTIONS, SELECTIONS, SURROGATES

SEED_MAX = 2**63 - 1  # seeds are stored as HDF5 int64 attributes


ProjectionKind = Enum("ProjectionKind", {p: p for p in PROJECTIONS}, type=str)  # type: ignore[misc]


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


Method = Enum("Method", {m: m for m in METHODS}, type=str)  # type: ignore[misc]


Selection = Enum("Selection", {m: m for m in SELECTIONS}, type=str)  # type: ignore[misc]
