"""The inputs of a stage that runs the model: the model (as its adapter), the data sets on their device, the memory
budget, and the provenance of the run."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

from ntk_explain import store
from ntk_explain.errors import UsageError
from ntk_explain.loading.adapter import ModelAdapter
from ntk_explain.loading.data import Dataset, input_keys, load_dataset
from ntk_explain.loading.models import check_model_on_data, load_model
from ntk_explain.options import Budget
from ntk_explain.resources import memory_budget, resolve_device
from ntk_explain.stages import distributed


def split_list(text: str | None, option: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
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
