"""The kernel stage: data → tangent features → kernel blocks → the run file's /kernel/<name>, tile by tile under the
memory budget, every tile checkpointed."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import replace

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from ntk_explain import store
from ntk_explain.errors import BadInputError
from ntk_explain.features.featurizer import SKETCH_PROBE, Featurizer, featurizer
from ntk_explain.kernel.factors import Factors
from ntk_explain.kernel.grams import contraction
from ntk_explain.kernel.tiles import Tiles, kernel_blocks, self_kernel
from ntk_explain.loading.adapter import Batch, ModelAdapter, as_adapter
from ntk_explain.loading.data import Dataset
from ntk_explain.options import Budget, KernelSpec
from ntk_explain.stages import distributed
from ntk_explain.stages.distributed import Shard
from ntk_explain.stages.progress import Progress, Silent

MAX_TILE = 4096  # default cap on rows per tile, so that progress is reported often enough


TILE_ALIGN = 64


_CLASS_DIMS = {"trace": (), "diagonal": ("class",), "full": ("class", "class")}


def network_logits(model: nn.Module | ModelAdapter, x: Tensor | Batch, budget: Budget) -> Tensor:
    """f_θ(x) (N, C) in eval mode, in batches, on CPU."""
    adapter, inputs = as_adapter(model), Batch.of(x)
    batch = budget.batch_size or 1024
    with torch.no_grad():
        rows = range(0, len(inputs), batch)
        logits = torch.cat([adapter(inputs[s : s + batch].to(budget.device)).cpu() for s in rows])
    return _finite(logits, "the network's outputs")


def _finite(values: Tensor, what: str) -> Tensor:
    """`values`, unless some are NaN or infinite: finite inputs and weights whose products overflow the dtype."""
    if not torch.isfinite(values).all():
        dtype = str(values.dtype).removeprefix("torch.")
        hint = "; try --dtype float64" if values.dtype != torch.float64 else ""
        raise BadInputError(f"{what} are not finite: the inputs or weights overflow {dtype}{hint}")
    return values


def write_data(run: h5py.File, split: str, data: Dataset, logits: Tensor) -> None:
    """/data/<split>/: labels, index into the source file, network logits (kept when an interrupted run of the same
    data wrote them all: its `sha256` attribute is written last)."""
    name = f"data/{split}"
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


def tile_size(n: int, per_sample: int, per_pair: int, budget: Budget) -> int:
    """Rows per tile: featurising a tile takes ≤ 1/2 the budget, a Gram block ≤ 1/4; `MAX_TILE` by default. A tile
    from the budget is rounded down to a multiple of `TILE_ALIGN` (chunks of the run file divide it)."""
    by_features = budget.bytes // (2 * max(1, per_sample))
    by_blocks = math.isqrt(budget.bytes // (4 * max(1, per_pair)))
    tile = max(1, min(n, budget.batch_size or MAX_TILE, by_features, by_blocks))
    return tile - tile % TILE_ALIGN if TILE_ALIGN < tile < n and budget.batch_size is None else tile


def chunk_tile(tile: int, *sizes: int) -> int | None:
    """The tile of a dataset written in tiles along axes of these sizes, or None when one tile holds them all."""
    return tile if tile < max(sizes) else None


def _write_kernel(
    group: h5py.Group,
    how: str,
    train: Tiles,
    test: Tiles | None,
    classes: int,
    dtype: np.dtype,
    progress: Progress,
    shard: Shard,
) -> None:
    """diag_train, train_train, then diag_test, test_train: written a row tile (a stripe of blocks) at a time, each
    checkpointed; only the `shard`'s row tiles, and none that an interrupted run checkpointed."""
    extra = _CLASS_DIMS[how]
    shape = (classes,) * len(extra)
    sets = [("train", train, None)] + ([("test", test, train)] if test is not None else [])
    for split, rows, cols in sets:
        ncols = (cols or rows).n
        tiling = chunk_tile(rows.tile, rows.n, ncols)
        diag = rows_dataset(group, f"diag_{split}", (rows.n, *shape), dtype, (split, *extra), tiling, 1)
        gram = rows_dataset(
            group, f"{split}_train", (rows.n, ncols, *shape), dtype, (split, "train", *extra), tiling, 2
        )
        blocks = len(rows.bounds) * len((cols or rows).bounds)
        progress.start(f"{group.name} {split}×train", blocks + len(rows.bounds))
        done = store.tiles_done(diag)
        for where, values in self_kernel(rows, how, lambda i, done=done: i >= done and shard.owns(i)):
            diag[where] = _finite(values, f"kernel values {group.name}/diag_{split}").cpu().numpy()
            store.checkpoint(diag, where.start // rows.tile + 1)
            progress.advance()
        done, stripe = store.tiles_done(gram), None  # stripe: the row tile whose blocks are being written
        for r, c, block in kernel_blocks(rows, cols, how, lambda i, done=done: i >= done and shard.owns(i)):
            mirrored = cols is None and c.start < r.start
            if stripe is not None and stripe != (c if mirrored else r):
                store.checkpoint(gram, stripe.start // rows.tile + 1)
            stripe = c if mirrored else r
            gram[r, c] = _finite(block, f"kernel values {group.name}/{split}_train").cpu().numpy()
            progress.advance(0 if mirrored else 1)
        if stripe is not None:
            store.checkpoint(gram, stripe.start // rows.tile + 1)


def rows_dataset(
    group: h5py.Group, name: str, shape: tuple, dtype: np.dtype, dims: tuple, tile: int | None, tiled_axes: int
) -> h5py.Dataset:
    """The dataset `name` of `group` as an interrupted run left it, or a new empty one with tile-aligned chunks."""
    if name in group:
        return group[name]
    return store.create_rows(group, name, shape, dtype, dims, tile, tiled_axes)


def _np(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _stored(dataset: h5py.Dataset, device: torch.device, dtype: torch.dtype) -> Callable[[int, int], Factors]:
    """Rows [start, stop) of stored features (n, K, d) in the compute dtype, as dense Factors."""
    return lambda start, stop: Factors(
        store.read_features(dataset, slice(start, stop)).to(device=device, dtype=dtype), (), ()
    )


def feature_tiles(
    features: Featurizer, x: Batch, tile: int, device: torch.device, progress: Progress, description: str
) -> Iterator[tuple[slice, Tensor]]:
    """(rows, projected features R g_k (rows, K, d)) of x, tile by tile, with progress."""
    progress.start(description, len(x))
    for start in range(0, len(x), tile):
        stop = min(len(x), start + tile)
        with torch.no_grad():
            yield slice(start, stop), features.featurize(x[start:stop].to(device)).dense
        progress.advance(stop - start)


def _store_features(
    group: h5py.Group,
    features: Featurizer,
    sets: list[Batch],
    dim: int,
    tile: int,
    budget: Budget,
    progress: Progress,
    dtype: torch.dtype,
) -> list[h5py.Dataset]:
    """Projected features R g_k of every set, tile by tile, into features/<split> (n, K, d) stored as `dtype`, each
    tile checkpointed. Each tile is computed by the rank that owns it and broadcast to all: every shard holds all
    features. Tiles that an interrupted run checkpointed (on every rank) are not computed again."""
    datasets, shard = [], budget.shard
    for split, x in zip(("train", "test"), sets, strict=False):
        name, shape = f"features/{split}", (len(x), features.classes, dim)
        if name not in group:
            store.features_dataset(group, name, shape, dtype, (split, "output", "proj"), chunk_tile(tile, len(x)))
        dataset = group[name]
        done = distributed.smallest(store.tiles_done(dataset), shard, budget.device)
        progress.start(f"{group.name} features {split}", len(x))
        for index, start in enumerate(range(0, len(x), tile)):
            rows = slice(start, min(len(x), start + tile))
            if index >= done:
                with torch.no_grad():
                    values = (
                        features.featurize(x[rows].to(budget.device)).dense
                        if shard.owns(index)
                        else torch.empty((rows.stop - start, *shape[1:]), dtype=features.dtype, device=budget.device)
                    )
                dataset[rows] = store.encode_features(distributed.broadcast(values, shard.owner(index), shard), dataset)
                store.checkpoint(dataset, index + 1)
            progress.advance(rows.stop - start)
        datasets.append(dataset)
    return datasets


def feature_kernel(
    group: h5py.Group,
    how: str,
    datasets: list[h5py.Dataset],
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
    test = tiles[1] if len(tiles) > 1 else None
    _write_kernel(group, how, tiles[0], test, classes, _np(dtype), progress, budget.shard)


def kernel_attrs(spec: KernelSpec, features: Featurizer, tile: int) -> dict:
    return {
        "kernel": spec.kernel,
        "projection": spec.projection if spec.projected else "none",
        "proj_dim": spec.proj_dim,
        "seed": spec.seed,
        "params": json.dumps(spec.params or ["*"]),
        **features.attrs,
        "tile": tile,
        **({"feature_dtype": spec.feature_dtype} if spec.projected and spec.feature_dtype else {}),
        "complete": True,
    }


def compute_kernel(
    run: h5py.File,
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
    again with half the tile, down to one row; `oom_retries` counts the restarts. With an explicit batch size, or
    several ranks (`budget.shard`), the error propagates.
    """
    done = run.get(f"kernel/{spec.name}")
    complete = done is not None and bool(done.attrs.get("complete"))
    if distributed.smallest(int(complete), budget.shard, budget.device):  # complete on every rank
        return store.attrs_dict(done)
    auto, retries = budget.batch_size is None and budget.shard.world == 1, 0
    while True:
        try:
            attrs = _compute_kernel(run, model, spec, train, test, budget, progress or Silent())
        except (torch.OutOfMemoryError, MemoryError):
            group = run.get(f"kernel/{spec.name}")
            tile = int(group.attrs["tile"]) if group is not None and "tile" in group.attrs else 0
            if not auto or tile <= 1:
                raise
            del run[f"kernel/{spec.name}"]
            if budget.device.type == "cuda":
                torch.cuda.empty_cache()
            budget, retries = replace(budget, batch_size=tile // 2), retries + 1
            continue
        store.set_attrs(run[f"kernel/{spec.name}"], {"oom_retries": retries})
        return {**attrs, "oom_retries": retries}


def _compute_kernel(
    run: h5py.File,
    model: nn.Module | ModelAdapter,
    spec: KernelSpec,
    train: Tensor | Batch,
    test: Tensor | Batch | None,
    budget: Budget,
    progress: Progress,
) -> dict:
    group = run.require_group(f"kernel/{spec.name}")
    sets = [Batch.of(train)] + ([Batch.of(test)] if test is not None else [])
    features = featurizer(model, spec, sets[0][:SKETCH_PROBE].to(budget.device), budget)
    if "tile" not in group.attrs:  # the ranks agree on one tile
        tile = tile_size(len(sets[0]), features.work_bytes, features.pair_bytes, budget)
        tile = distributed.smallest(tile, budget.shard, budget.device)
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
        tiles = [
            Tiles(lambda s, e, x=x: features.featurize(x[s:e].to(budget.device)), len(x), tile, keep) for x in sets
        ]
        test_tiles = tiles[1] if len(tiles) > 1 else None
        _write_kernel(group, how, tiles[0], test_tiles, features.classes, _np(features.dtype), progress, budget.shard)
    attrs = kernel_attrs(spec, features, tile)
    store.set_attrs(group, attrs)
    return attrs
