"""The inputs of a stage that runs the model: the model (as its adapter) and the data sets on the budget's device,
and the provenance of the run."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ntk_explain import store
from ntk_explain.loading.adapter import ModelAdapter
from ntk_explain.loading.data import Dataset, load_dataset
from ntk_explain.loading.models import check_model_on_data, load_model
from ntk_explain.options import Budget, InputSpec

HASHES = ("model_sha256", "weights_sha256", "data_sha256")  # the root attributes that identify model and data


@dataclass
class Inputs:
    """A loaded model and data sets on their device, the budget, and the run file's root attributes."""

    net: ModelAdapter
    data: dict[str, Dataset]
    budget: Budget
    classes: int
    attrs: dict


def budget_params(budget: Budget) -> dict:
    """The budget as recorded in a run's params (a resumed run reuses them)."""
    return {
        "device": str(budget.device),
        "batch_size": budget.batch_size or "auto",
        "max_memory": budget.bytes,
        "tile": budget.tile,
    }


def load_inputs(spec: InputSpec, budget: Budget, options: dict, seed: int) -> Inputs:
    """Load and check the model and the data of `spec` on the budget's device; the stage's own `options` are recorded
    with them, and with the budget, in the provenance."""
    dtype = getattr(torch, spec.dtype)
    loaded = load_model(spec.model, dict(spec.model_kwargs), spec.weights)
    net = ModelAdapter(loaded.module.to(device=budget.device, dtype=dtype).eval(), spec.output_key)
    keys = {"x_key": spec.x_key, "y_key": spec.y_key, "dtype": dtype}
    data = {"train": load_dataset(spec.train, "train", **keys, limit=spec.n_train)}
    if spec.test:
        data["test"] = load_dataset(spec.test, "test", **keys, limit=spec.n_test)
    classes = max(check_model_on_data(net, d) for d in data.values())
    params = {**spec.to_params(), **options, **budget_params(budget), "seed": seed}
    digests = {split: d.sha256 for split, d in data.items()}
    attrs = store.provenance(
        sys.argv, params, str(budget.device), seed, loaded.model_sha256, loaded.weights_sha256, digests
    )
    return Inputs(net, data, budget, classes, attrs)
