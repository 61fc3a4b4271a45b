"""The kernel stage: data → tangent features → kernel blocks → the run file's /kernel/<name>, tile by tile under the
memory budget, every tile checkpointed.

Two sizes are at work: the **tile**, the rows of a Gram block and of a checkpoint (from the memory budget), and the
**batch** of one forward and backward pass (`--batch-size`; auto: the tile), in which a tile's features are computed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from ntk_explain import store
from ntk_explain.errors import BadInputError
from ntk_explain.features.featurizer import SKETCH_PROBE, Featurizer, featurizer
from ntk_explain.kernel.factors import Factors
from ntk_explain.kernel.grams import contraction
from ntk_explain.kernel.tiles import Tiles, self_block, stripe
from ntk_explain.loading.adapter import Batch, ModelAdapter, as_adapter
from ntk_explain.loading.data import Dataset
from ntk_explain.options import Budget, KernelSpec
from ntk_explain.stages import distributed
from ntk_explain.stages.execution import Progress, Silent
from ntk_explain.stages.rows import resumable_tiles
from ntk_explain.store import layout

MAX_TILE = 4096  # default cap on rows per tile, so that progress is reported often enough
TILE_ALIGN = 64
_CLASS_DIMS = {"trace": (), "diagonal": ("class",), "full": ("class", "class")}


def network_logits(model: nn.Module | ModelAdapter, x: Tensor | Batch, budget: Budget) -> Tensor:
    """f_θ(x) (N, C) in eval mode, in batches of `budget.batch_size` (default 1024), on CPU."""
    adapter, inputs = as_adapter(model), Batch.of(x)
    batch = budget.batch_size or 1024
    with torch.no_grad():
        rows = range(0, len(inputs), batch)
        logits = torch.cat([adapter(inputs[s : s + batch].to(budget.device)).cpu() for s in rows])
    return finite(logits, "the network's outputs")


def finite(values: Tensor, what: str) -> Tensor:
    """`values`, unless some are NaN or infinite: finite inputs and weights whose products overflow the dtype."""
    if not torch.isfinite(values).all():
        dtype = str(values.dtype).removeprefix("torch.")
        hint = "; try --dtype float64" if values.dtype != torch.float64 else ""
        raise BadInputError(f"{what} are not finite: the inputs or weights overflow {dtype}{hint}")
    return values


def write_data(run: store.H5File, split: str, data: Dataset, logits: Tensor) -> None:
    """/data/<split>/: labels, index into the source file, network logits (kept when an interrupted run of the same
    data wrote them all: its `sha256` attribute is written last)."""
    name = layout.data(split)
    if name in run and "sha256" in run[name].attrs:
        return
    if name in run:
        del run[name]
    group = run.create_group(name)
    store.write_array(group, "labels", data.y.numpy(), (split,))
    store.write_array(group, "index", data.index, (split,))
    store.write_array(group, "nn_logits", logits.numpy(), (split, "class"))
    store.set_attrs(group, {"source": data.source})
    store.mark(group, "sha256", data.sha256)


def tile_size(n: int, features: Featurizer, budget: Budget) -> int:
    """Rows per tile: a Gram block takes ≤ 1/4 of the budget; featurising takes ≤ 1/2, for a whole tile in auto mode,
    else for one batch of `budget.batch_size` passes and the tile's kept features; `MAX_TILE` at most. Rounded down
    to a multiple of `TILE_ALIGN` (chunks of the run file divide it). `budget.tile` overrides it."""
    if budget.tile is not None:
        return min(n, budget.tile)
    if budget.batch_size is None:
        by_features = budget.bytes // (2 * max(1, features.work_bytes))
    else:
        left = budget.bytes // 2 - budget.batch_size * features.work_bytes
        by_features = max(1, left // max(1, features.kept_bytes))
    by_blocks = math.isqrt(budget.bytes // (4 * max(1, features.pair_bytes)))
    tile = max(1, min(n, MAX_TILE, by_features, by_blocks))
    return tile - tile % TILE_ALIGN if TILE_ALIGN < tile < n else tile


def in_batches(features: Featurizer, x: Batch, batch: int | None, device: torch.device) -> Factors:
    """The features of the rows x, computed in passes of `batch` rows (all at once when None) and joined."""
    if batch is None or batch >= len(x):
        return features.featurize(x.to(device))
    return Factors.joined([features.featurize(x[s : s + batch].to(device)) for s in range(0, len(x), batch)])


def chunk_tile(tile: int, *sizes: int) -> int | None:
    """The tile of a dataset written in tiles along axes of these sizes, or None when one tile holds them all."""
    return tile if tile < max(sizes) else None


def rows_dataset(
    group: store.H5Group, name: str, shape: tuple, dtype: np.dtype, dims: tuple, tile: int | None, tiled_axes: int
) -> store.H5Dataset:
    """The dataset `name` of `group` as an interrupted run left it, or a new empty one with tile-aligned chunks."""
    if name in group:
        return group[name]
    return store.create_rows(group, name, shape, dtype, dims, tile, tiled_axes)


def _write_kernel(
    group: store.H5Group,
    how: str,
    sets: list[Tiles],
    classes: int,
    dtype: torch.dtype,
    budget: Budget,
    progress: Progress,
) -> None:
    """diag_train, train_train, then diag_test, test_train: written a row tile (a stripe of blocks) at a time, each
    checkpointed; only the shard's row tiles, and none that an interrupted run checkpointed."""
    extra = _CLASS_DIMS[how]
    shape, stored, owned = (classes,) * len(extra), torch.empty((), dtype=dtype).numpy().dtype, budget.shard.owns
    for split, rows, cols in zip(layout.SPLITS, sets, [None, sets[0]], strict=False):
        ncols, tiled = (cols or rows).n, chunk_tile(rows.tile, rows.n, (cols or rows).n)
        diag_name, block_name = layout.diag(split), layout.block(split)
        diag = rows_dataset(group, diag_name, (rows.n, *shape), stored, (split, *extra), tiled, 1)
        gram = rows_dataset(group, block_name, (rows.n, ncols, *shape), stored, (split, "train", *extra), tiled, 2)
        where_diag, where_gram = f"{group.name}/{diag_name}", f"{group.name}/{block_name}"
        for index, rows_written in resumable_tiles(diag, rows.n, rows.tile, progress, where_diag, owned=owned):
            diag[rows_written] = finite(self_block(rows, how, index), f"kernel values {where_diag}").cpu().numpy()
        for index, _ in resumable_tiles(gram, rows.n, rows.tile, progress, f"{group.name} {split}×train", owned=owned):
            for r, c, block in stripe(rows, cols, how, index):
                gram[r, c] = finite(block, f"kernel values {where_gram}").cpu().numpy()


def _stored(dataset: store.H5Dataset, device: torch.device, dtype: torch.dtype) -> Callable[[int, int], Factors]:
    """Rows [start, stop) of stored features (n, K, d) in the compute dtype, as dense Factors."""
    return lambda start, stop: Factors(
        store.read_features(dataset, slice(start, stop)).to(device=device, dtype=dtype), (), ()
    )


def _store_features(
    group: store.H5Group,
    features: Featurizer,
    sets: list[Batch],
    dim: int,
    tile: int,
    budget: Budget,
    progress: Progress,
    dtype: torch.dtype,
) -> list[store.H5Dataset]:
    """Projected features R g_k of every set, tile by tile, into features/<split> (n, K, d) stored as `dtype`, each
    tile checkpointed. Each tile is computed by the rank that owns it and broadcast to all: every shard holds all
    features. Tiles that an interrupted run checkpointed (on every rank) are not computed again."""
    datasets, shard = [], budget.shard
    for split, x in zip(layout.SPLITS, sets, strict=False):
        name, shape = layout.features(split), (len(x), features.classes, dim)
        if name not in group:
            store.features_dataset(group, name, shape, dtype, (split, "output", "proj"), chunk_tile(tile, len(x)))
        dataset = group[name]
        done = distributed.smallest(store.tiles_done(dataset), shard, budget.device)
        for index, rows in resumable_tiles(dataset, len(x), tile, progress, f"{group.name} {name}", done=done):
            with torch.no_grad():
                values = (
                    in_batches(features, x[rows], budget.batch_size, budget.device).dense
                    if shard.owns(index)
                    else torch.empty((rows.stop - rows.start, *shape[1:]), dtype=features.dtype, device=budget.device)
                )
            dataset[rows] = store.encode_features(distributed.broadcast(values, shard.owner(index), shard), dataset)
        datasets.append(dataset)
    return datasets


def feature_kernel(
    group: store.H5Group,
    how: str,
    datasets: list[store.H5Dataset],
    classes: int,
    tile: int,
    keep: bool,
    budget: Budget,
    progress: Progress,
    dtype: torch.dtype,
) -> None:
    """The kernel blocks and diagonals of stored features features/{train,test} (n, K, d), computed and stored in
    the compute `dtype` whatever the features' storage type."""
    tiles = [Tiles(_stored(ds, budget.device, dtype), ds.shape[0], tile, keep) for ds in datasets]
    _write_kernel(group, how, tiles, classes, dtype, budget, progress)


def kernel_attrs(spec: KernelSpec, features: Featurizer, tile: int) -> dict:
    """A kernel group's attributes: what was computed, how (the featurizer's), in which tiles."""
    return {
        "kernel": spec.kernel,
        "projection": spec.projection if spec.projected else "none",
        "proj_dim": spec.proj_dim,
        "seed": spec.seed,
        "params": json.dumps(spec.params or ["*"]),
        **features.attrs,
        "tile": tile,
        "dims": ["rows", "train", *_CLASS_DIMS[contraction(spec.kernel)]],
        **({"feature_dtype": spec.feature_dtype} if spec.projected and spec.feature_dtype else {}),
        "complete": True,
    }


def compute_kernel(
    run: store.H5File,
    model: nn.Module | ModelAdapter,
    spec: KernelSpec,
    train: Tensor | Batch,
    test: Tensor | Batch | None,
    budget: Budget,
    progress: Progress | None = None,
) -> dict:
    """Write /kernel/<spec.name>/ for the train (and test) inputs; returns its attrs.

    A group that an interrupted run left in `run` is continued in its own tiles from its checkpoints (a complete one
    is kept as it is), so the numbers are those of an uninterrupted run. Without a batch size (`budget.batch_size`
    None: auto) the tile comes from the memory budget, and running out of memory (CPU or CUDA) starts the kernel
    again with half the tile (and batch), down to one row; `oom_retries` counts the restarts. With an explicit batch
    size or tile, or several ranks (`budget.shard`), the error propagates.
    """
    name = layout.kernel(spec.name)
    job = _Job(run, as_adapter(model), spec, [Batch.of(train)] + ([Batch.of(test)] if test is not None else []))
    done = run.get(name)
    complete = done is not None and bool(done.attrs.get("complete"))
    if distributed.smallest(int(complete), budget.shard, budget.device):  # complete on every rank
        return store.attrs_dict(done)
    auto, retries = budget.batch_size is None and budget.tile is None and budget.shard.world == 1, 0
    while True:
        try:
            attrs = _compute_kernel(job, budget, progress or Silent())
        except (torch.OutOfMemoryError, MemoryError):
            group = run.get(name)
            failed = int(group.attrs["tile"]) if group is not None and "tile" in group.attrs else 0
            if not auto or failed <= 1:
                raise
            del run[name]
            if budget.device.type == "cuda":
                torch.cuda.empty_cache()
            budget, retries = replace(budget, tile=failed // 2), retries + 1
            continue
        store.set_attrs(run[name], {"oom_retries": retries})
        return {**attrs, "oom_retries": retries}


@dataclass(frozen=True)
class _Job:
    """A kernel to compute: the run file, the model, the kernel, and its data sets (train, then test)."""

    run: store.H5File
    model: ModelAdapter
    spec: KernelSpec
    sets: list[Batch]


def _compute_kernel(job: _Job, budget: Budget, progress: Progress) -> dict:
    """`compute_kernel` once, in the tiles that an interrupted run recorded, or from the budget."""
    run, spec, sets = job.run, job.spec, job.sets
    group = run.require_group(layout.kernel(spec.name))
    features = featurizer(job.model, spec, sets[0][:SKETCH_PROBE].to(budget.device), budget)
    if "tile" not in group.attrs:  # the ranks agree on one tile
        tile = distributed.smallest(tile_size(len(sets[0]), features, budget), budget.shard, budget.device)
        store.set_attrs(group, {"tile": tile, "complete": False})
        run.flush()
    tile = int(group.attrs["tile"])
    keep = sum(len(x) for x in sets) * features.kept_bytes <= budget.bytes // 4
    how = contraction(spec.kernel)
    if spec.projected:
        stored = getattr(torch, spec.feature_dtype) if spec.feature_dtype else features.dtype
        datasets = _store_features(group, features, sets, spec.proj_dim, tile, budget, progress, stored)
        feature_kernel(group, how, datasets, features.classes, tile, keep, budget, progress, features.dtype)
    else:
        batch, device = budget.batch_size, budget.device
        tiles = [Tiles(lambda s, e, x=x: in_batches(features, x[s:e], batch, device), len(x), tile, keep) for x in sets]
        _write_kernel(group, how, tiles, features.classes, features.dtype, budget, progress)
    attrs = kernel_attrs(spec, features, tile)
    store.set_attrs(group, attrs)
    return attrs
