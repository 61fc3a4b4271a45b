"""The intermediate state of a distillation in its scratch file: every point's projected features, written a tile
at a time, and kip's state (the support, Adam's moments, the generator, the losses), so that a resumed run goes on
where an interrupted one stopped."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import Tensor

from ntk_explain import store
from ntk_explain.distillation.kip import KipState
from ntk_explain.features.featurizer import Featurizer
from ntk_explain.loading.adapter import Batch
from ntk_explain.options import Budget
from ntk_explain.stages.execution import Progress
from ntk_explain.stages.kernels import chunk_tile, in_batches
from ntk_explain.stages.rows import resumable_tiles
from ntk_explain.store import layout

KIP = "kip"


def stored_features(
    scratch: store.H5File,
    split: str,
    features: Featurizer,
    x: Batch,
    width: int,
    tile: int,
    budget: Budget,
    progress: Progress,
) -> Tensor:
    """The projected features of every row of x, flattened to (n, K·d = `width`) (the trace kernel is their inner
    product), on the budget's device; computed a tile at a time into the scratch file, those of an interrupted run
    kept."""
    name = layout.features(split)
    if name not in scratch:
        dtype = torch.empty((), dtype=features.dtype).numpy().dtype
        store.create_rows(scratch, name, (len(x), width), dtype, (split, "feature"), chunk_tile(tile, len(x)))
    dataset = scratch[name]
    for _, rows in resumable_tiles(dataset, len(x), tile, progress, f"{split} features"):
        with torch.no_grad():
            values = in_batches(features, x[rows], budget.batch_size, budget.device).dense
        dataset[rows] = values.reshape(len(values), -1).cpu().numpy()
    return torch.from_numpy(dataset[()]).to(budget.device)


def save_kip(scratch: store.H5File, state: KipState) -> None:
    """Replace the kept kip state by `state`, flushed before its `step` marker is (a kill keeps the last whole one)."""
    if KIP in scratch:
        del scratch[KIP]
    group = scratch.create_group(KIP)
    for name, tensor in (("inputs", state.inputs), ("labels", state.labels)):
        store.write_array(group, name, tensor.cpu().numpy(), ("row", *("axis",) * (tensor.dim() - 1)))
    store.write_array(group, "generator", state.generator.numpy(), ("byte",))
    store.write_array(group, "losses", np.array(state.losses, dtype=np.float64), ("step",))
    moments = group.create_group("optimizer")
    for index, entries in state.optimizer["state"].items():
        for key, value in entries.items():
            array = value.cpu().numpy()
            store.write_array(moments, f"{index}/{key}", array, tuple(f"axis{j}" for j in range(array.ndim)))
    store.set_attrs(moments, {"param_groups": json.dumps(state.optimizer["param_groups"])})
    store.mark(group, "step", state.step)


def load_kip(scratch: store.H5File) -> KipState | None:
    """The kip state that an interrupted run kept, or None."""
    group = scratch.get(KIP)
    if group is None or "step" not in group.attrs:
        return None
    moments = group["optimizer"]
    optimizer = {
        "state": {
            int(index): {key: torch.from_numpy(np.asarray(moments[index][key][()])) for key in moments[index]}
            for index in moments
        },
        "param_groups": json.loads(moments.attrs["param_groups"]),
    }
    return KipState(
        int(group.attrs["step"]),
        torch.from_numpy(group["inputs"][()]),
        torch.from_numpy(group["labels"][()]),
        optimizer,
        torch.from_numpy(group["generator"][()]),
        group["losses"][()].tolist(),
    )
