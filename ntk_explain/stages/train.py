"""The train stage: a plain training recipe (SGD, Adam, AdamW on the mean cross-entropy, shuffled minibatches) with
its trajectory recorded (`trajectory.Recorder`), for the path kernel. Deterministic on CPU: the initialisation and
the shuffling come from `recipe.seed`; a killed run resumed (`how.resume`) continues from its last recorded step."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from ntk_explain import resources as devices
from ntk_explain import store
from ntk_explain.loading.adapter import ModelAdapter
from ntk_explain.loading.data import load_dataset
from ntk_explain.loading.models import check_model_on_data, load_model
from ntk_explain.options import InputSpec, Resources, TrainSpec
from ntk_explain.stages.execution import Execution
from ntk_explain.stages.kernels import network_logits
from ntk_explain.trajectory import Recorder


def optimizer_for(recipe: TrainSpec, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """The recipe's optimiser over `params` (single-tensor implementation: its arithmetic is the documented one)."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, foreach=False
        )
    kind = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=recipe.lr, weight_decay=recipe.weight_decay, foreach=False)


def batches(n: int, recipe: TrainSpec) -> Iterator[Tensor]:
    """The training rows of every step: each epoch a fresh permutation (seeded), cut into batches."""
    generator = torch.Generator().manual_seed(recipe.seed)
    for _ in range(recipe.epochs):
        yield from torch.randperm(n, generator=generator).split(recipe.batch_size)


def _save_weights(module: nn.Module, path: Path) -> None:
    """The model's state (parameters and buffers) as safetensors, atomically."""
    tmp = store.partial_path(path)
    safetensors.torch.save_model(module, str(tmp))
    os.replace(tmp, path)


def train(
    inputs: InputSpec, recipe: TrainSpec, out: Path, trajectory: Path, resources: Resources, how: Execution
) -> dict:
    """Train the model of `inputs` (its --weights as the start, else the factory's initialisation under the seed) on
    its training data with `recipe` in eval() mode, recording the trajectory into `trajectory` and the final weights
    into `out` (safetensors). Returns a summary."""
    store.check_target(out, overwrite=how.overwrite or how.resume)
    budget = devices.budget(resources)
    dtype = getattr(torch, inputs.dtype)
    torch.manual_seed(recipe.seed)
    loaded = load_model(inputs.model, dict(inputs.model_kwargs), inputs.weights)
    module = loaded.module.to(device=budget.device, dtype=dtype).eval()
    net = ModelAdapter(module, inputs.output_key)
    keys = {"x_key": inputs.x_key, "y_key": inputs.y_key, "dtype": dtype}
    data = load_dataset(inputs.train, "train", **keys, limit=inputs.n_train)
    check_model_on_data(net, data)
    x, y = data.inputs.to(budget.device), data.y.to(budget.device)
    optimizer = optimizer_for(recipe, module.parameters())
    extra = {"data_sha256": data.sha256, "model_sha256": loaded.model_sha256, "recipe": recipe.to_params()}
    began, losses = time.perf_counter(), []
    with Recorder(trajectory, module, optimizer, extra=extra, overwrite=how.overwrite, resume=how.resume) as recorder:
        done = recorder.steps
        total = recipe.epochs * -(-len(y) // recipe.batch_size)
        how.progress.start("train", total)
        how.progress.advance(done)
        for step, rows in enumerate(batches(len(y), recipe)):
            if step < done:
                continue
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x[rows.to(x.device)]), y[rows.to(y.device)])
            loss.backward()
            optimizer.step()
            recorder.step(rows)
            losses.append(float(loss.detach()))
            how.progress.advance()
        _save_weights(module, out)
    accuracy = float((network_logits(net, data.inputs, budget).argmax(1) == data.y).double().mean())
    return {
        "out": str(out),
        "trajectory": str(trajectory),
        "steps": total,
        "resumed_at": done,
        "final_loss": losses[-1] if losses else None,
        "train_accuracy": accuracy,
        "seconds": round(time.perf_counter() - began, 3),
    }
