"""The stages: compute (data → tangent features → kernel blocks → run file) and attribute (kernel → surrogate →
attribution and faithfulness).

Work is tiled in row tiles of the data sets; a tile's features are kept in memory for reuse only
when all of them fit the budget, and the kernel is written block by block, so peak memory follows
the memory budget rather than N.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Protocol

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from ntk_explain import distributed, store
from ntk_explain.adapter import Batch, ModelAdapter
from ntk_explain.attribution import all_class_scores, attribution_scores, extremes
from ntk_explain.distillation import (
    DISTILL_METRICS,
    KIP,
    METHODS,
    SELECTIONS,
    allocate,
    centred,
    centred_one_hot,
    class_ranks,
    gradient_support,
    kernel_alignment,
    nearest,
    predictor_kernel,
    select,
    unit_rows,
)
from ntk_explain.distributed import Shard
from ntk_explain.errors import BadInputError, OutOfMemoryError, UsageError
from ntk_explain.gradients import Factors, as_adapter, penultimate, tangent_factors
from ntk_explain.kernels import (
    KERNELS,
    Tiles,
    contraction,
    kernel_blocks,
    output_map,
    project,
    self_kernel,
    sketch,
    sketch_layout,
)
from ntk_explain.loading import Dataset
from ntk_explain.metrics import faithfulness
from ntk_explain.planning import plan_tangents
from ntk_explain.projections import PROJECTIONS, SKETCHES, Projection
from ntk_explain.surrogate import FeatureKernel, Kernel, KernelGLM, KernelRidge

FEATURE_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_DIMS = {"pseudo": 4096, "trace": 10240, "diagonal": 10240, "full": 10240}
SKETCH_PROBE = 64  # the first training rows, which set a sketch's layout (directions, shares of d)
MAX_TILE = 4096  # default cap on rows per tile, so that progress is reported often enough
TILE_ALIGN = 64
_CLASS_DIMS = {"trace": (), "diagonal": ("class",), "full": ("class", "class")}


class Progress(Protocol):
    def start(self, description: str, total: int) -> None: ...

    def advance(self, steps: int = 1) -> None: ...


class Silent:
    """A Progress that reports nothing."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass


@dataclass(frozen=True)
class KernelSpec:
    """One kernel to compute: its variant, projection and parameter selection."""

    kernel: str
    projection: str = "none"
    dim: int | None = None
    seed: int = 0
    params: tuple[str, ...] | None = None
    feature_dtype: str | None = None  # storage of projected features: float32, float16, bfloat16 (None: as computed)

    def __post_init__(self) -> None:
        if self.feature_dtype not in (None, *FEATURE_DTYPES):
            raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}")

    @property
    def projected(self) -> bool:
        """ck is a feature kernel already: it is never projected."""
        return self.projection != "none" and self.kernel != "ck"

    @property
    def proj_dim(self) -> int:
        return (self.dim or DEFAULT_DIMS[self.kernel]) if self.projected else 0

    @property
    def name(self) -> str:
        """The group name under /kernel: `trace`, or `trace-gaussian-4096` when projected."""
        return f"{self.kernel}-{self.projection}-{self.proj_dim}" if self.projected else self.kernel


@dataclass(frozen=True)
class Budget:
    """Where and within how many bytes the work runs."""

    device: torch.device
    bytes: int
    batch_size: int | None = None
    shard: Shard = field(default_factory=Shard)  # which row tiles this process computes


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


def _tile_size(n: int, per_sample: int, per_pair: int, budget: Budget) -> int:
    """Rows per tile: featurising a tile takes ≤ 1/2 the budget, a Gram block ≤ 1/4; `MAX_TILE` by default. A tile
    from the budget is rounded down to a multiple of `TILE_ALIGN` (chunks of the run file divide it)."""
    by_features = budget.bytes // (2 * max(1, per_sample))
    by_blocks = math.isqrt(budget.bytes // (4 * max(1, per_pair)))
    tile = max(1, min(n, budget.batch_size or MAX_TILE, by_features, by_blocks))
    return tile - tile % TILE_ALIGN if TILE_ALIGN < tile < n and budget.batch_size is None else tile


def _tiling(tile: int, *sizes: int) -> int | None:
    """The tile of a dataset written in tiles along axes of these sizes, or None when one tile holds them all."""
    return tile if tile < max(sizes) else None


@dataclass(frozen=True)
class Featurizer:
    """Features of a kernel for a batch of inputs, with its memory estimates in bytes."""

    featurize: Callable[[Tensor | Batch], Factors]
    classes: int  # size of each class axis of the kernel (1 for pseudo and ck)
    dtype: torch.dtype  # of the features, hence of the kernel
    work_bytes: int  # per sample, while featurising
    kept_bytes: int  # per sample, of the features kept
    pair_bytes: int  # per (row, column) pair of a Gram block
    attrs: dict


def featurizer(model: nn.Module | ModelAdapter, spec: KernelSpec, probe: Tensor | Batch, budget: Budget) -> Featurizer:
    """The featurizer of `spec` for inputs like `probe` (a few samples, on the budget's device): its first two
    samples plan the tangents and prove the plan (`plan_tangents`); for a sketch, all of it sets the layout: the
    layers' directions and the groups' shares of d (`sketch_layout`)."""
    adapter, probe = as_adapter(model), Batch.of(probe)
    if spec.kernel == "ck":
        phi = penultimate(adapter, probe[:1])
        width, itemsize = phi.shape[-1], phi.element_size()
        return Featurizer(
            featurize=lambda x: Factors(penultimate(adapter, x)[:, None, :], (), ()),
            classes=1,
            dtype=phi.dtype,
            work_bytes=4 * itemsize * width,
            kept_bytes=itemsize * width,
            pair_bytes=3 * itemsize,
            attrs={},
        )
    plan = plan_tangents(adapter, probe, output_map(spec.kernel), spec.params, max_check_bytes=budget.bytes // 4)
    itemsize = plan.dtype.itemsize
    k = plan.outputs
    entries = {"trace": 1, "diagonal": k, "full": k * k}[contraction(spec.kernel)]  # per (row, column) pair
    dense = sum(plan.params[n].numel() for n in plan.dense)
    kept = k * dense + sum(layer.sites * (k * layer.out_features + layer.in_features + 1) for layer in plan.layers)
    kept += sum(lookup.sites * (k * lookup.features + 1) for lookup in plan.lookups)
    sites = max((s.sites for s in (*plan.layers, *plan.lookups)), default=1)
    formed = sum(layer.sites * (k * layer.out_features + layer.in_features) for layer in plan.formed)  # δ and a
    formed += sum(lookup.sites * k * lookup.features for lookup in plan.formed_lookups)
    work = 2 * (k + 1) * plan.activation_numel + 2 * kept + formed
    attrs = {
        "n_params": plan.n_params,
        "outputs": k,
        "factorised": [layer.module for layer in plan.layers] or [""],
        "formed": [layer.module for layer in plan.formed] or [""],
        "tangent_path": plan.path,
        "generic": json.dumps(_by_reason(plan.generic)),
        **{f"check_{key}": value for key, value in plan.check.items()},
    }
    if not spec.projected:
        return Featurizer(
            featurize=lambda x: tangent_factors(adapter, plan, x),
            classes=k,
            dtype=plan.dtype,
            work_bytes=itemsize * work,
            kept_bytes=itemsize * kept,
            pair_bytes=itemsize * 3 * entries * sites * sites,
            attrs=attrs,
        )
    projection = Projection(spec.projection, spec.proj_dim, spec.seed)
    if spec.projection in SKETCHES:
        groups = bool(plan.dense or plan.lookups) + 3 * len(plan.layers)  # `SketchLayout.groups`
        if spec.proj_dim < groups:
            raise UsageError(
                f"--proj-dim {spec.proj_dim} is too small for a {spec.projection} of this model: its {groups} groups "
                "(the other parameters, then each layer's rows, columns and rest) need a dimension each"
            )
        with torch.no_grad():
            layout = sketch_layout(tangent_factors(adapter, plan, probe), spec.proj_dim, spec.projection)
        attrs.update(
            sketch_groups=layout.groups, sketch_dims=layout.dims, sketch_exact=layout.exact, sketch_probe=len(probe)
        )
        features = functools.partial(sketch, projection=projection, layout=layout)
    else:
        features = functools.partial(project, projection=projection, block_numel=max(1, budget.bytes // (8 * itemsize)))

    def featurize(x: Tensor | Batch) -> Factors:
        return Factors(features(plan, tangent_factors(adapter, plan, x)), (), ())

    return Featurizer(
        featurize=featurize,
        classes=k,
        dtype=plan.dtype,
        work_bytes=itemsize * (work + k * spec.proj_dim),
        kept_bytes=itemsize * k * spec.proj_dim,
        pair_bytes=itemsize * 3 * entries,
        attrs=attrs,
    )


def _by_reason(generic: dict[str, str]) -> dict[str, list[str]]:
    """The generic parameters grouped by the reason they are not structured."""
    grouped: dict[str, list[str]] = {}
    for name, reason in generic.items():
        grouped.setdefault(reason, []).append(name)
    return grouped


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
        tiling = _tiling(rows.tile, rows.n, ncols)
        diag = _rows_dataset(group, f"diag_{split}", (rows.n, *shape), dtype, (split, *extra), tiling, 1)
        gram = _rows_dataset(
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


def _rows_dataset(
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


def _feature_tiles(
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
            store.features_dataset(group, name, shape, dtype, (split, "output", "proj"), _tiling(tile, len(x)))
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


def _feature_kernel(
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


def _kernel_attrs(spec: KernelSpec, features: Featurizer, tile: int) -> dict:
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
        tile = _tile_size(len(sets[0]), features.work_bytes, features.pair_bytes, budget)
        tile = distributed.smallest(tile, budget.shard, budget.device)
        store.set_attrs(group, {"tile": tile, "complete": False})
        run.flush()
    tile = int(group.attrs["tile"])
    keep = sum(len(x) for x in sets) * features.kept_bytes <= budget.bytes // 4
    how = contraction(spec.kernel)
    if spec.projected:
        stored = getattr(torch, spec.feature_dtype) if spec.feature_dtype else features.dtype
        datasets = _store_features(group, features, sets, spec.proj_dim, tile, budget, progress, stored)
        _feature_kernel(group, how, datasets, features.classes, tile, keep, budget, progress, features.dtype)
    else:
        tiles = [
            Tiles(lambda s, e, x=x: features.featurize(x[s:e].to(budget.device)), len(x), tile, keep) for x in sets
        ]
        test_tiles = tiles[1] if len(tiles) > 1 else None
        _write_kernel(group, how, tiles[0], test_tiles, features.classes, _np(features.dtype), progress, budget.shard)
    attrs = _kernel_attrs(spec, features, tile)
    store.set_attrs(group, attrs)
    return attrs


DEFAULT_REDUCTION = 20.0  # N/m when neither --reduction nor --per-class is given


@dataclass(frozen=True)
class DistillSpec:
    """How `distill` builds its support: the method, its size (m = N/reduction, or per_class per class), the classes
    (the network's predictions or the labels) and, for kip, the optimiser's settings."""

    method: str = "kip"
    selection: str = "random"
    reduction: float | None = DEFAULT_REDUCTION
    per_class: int | None = None
    target: str = "model"
    kip: KIP = field(default_factory=KIP)
    neighbours: int = 5
    seed: int = 0

    def options(self) -> dict:
        """The settings as recorded in the run file's provenance."""
        kip = {key: getattr(self.kip, key) for key in ("steps", "lr", "reg", "batch_size", "learn_labels")}
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "kip"}, "kip": kip}

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}")

    def sizes(self, class_sizes: list[int]) -> list[int]:
        """m_c of every class: per_class each (at most n_c), or N/reduction split in proportion to the classes."""
        if self.per_class is not None:
            return [min(n, self.per_class) for n in class_sizes]
        return allocate(class_sizes, round(sum(class_sizes) / (self.reduction or DEFAULT_REDUCTION)))


RANK_EPS = (0.01, 0.05)


def _all_features(
    features: Featurizer, x: Batch, tile: int, device: torch.device, progress: Progress, description: str
) -> Tensor:
    """Projected features of every row of x, flattened to (n, K·d): the trace kernel is their inner product."""
    return torch.cat(
        [
            values.reshape(len(values), -1)
            for _, values in _feature_tiles(features, x, tile, device, progress, description)
        ]
    )


@dataclass
class Support:
    """A distilled support: features φ (m, K·d), classes (m,), labels y_s (m, C), the inputs when it has any, the
    training row each point came from (None for synthetic features), kip's losses, and the Jacobians it took."""

    features: Tensor
    classes: Tensor
    labels: Tensor
    inputs: Tensor | None = None
    source: Tensor | None = None
    losses: list[float] | None = None
    jacobians: int = 0


def build_support(
    distill: DistillSpec,
    feature_map: Callable[[Tensor], Tensor],
    x: Batch,
    phi: Tensor,
    classes: Tensor,
    outputs: Tensor,
    sizes: list[int],
    progress: Progress,
) -> Support:
    """The support of `distill.method` from the training inputs x (N, …, any device), their features φ (N, K·d),
    classes and network outputs y_t (N, C) (kip's targets); `feature_map` gives the (differentiable) features of
    inputs. Only the chosen rows of x move to φ's device."""
    n_classes = outputs.shape[1]
    if distill.method == "gradient":
        features, support_classes = gradient_support(phi, classes, sizes, distill.seed)
        return Support(features, support_classes, centred_one_hot(support_classes, n_classes, phi.dtype))
    source = select(phi, classes, sizes, distill.selection, distill.seed)  # kip's starting points too
    labels = centred_one_hot(classes[source], n_classes, phi.dtype)
    chosen = x[source.cpu()].to(phi.device)
    inputs = None if chosen.keyword else next(iter(chosen.arrays.values()))  # several named arrays: by source row
    if distill.method == "select":
        return Support(phi[source], classes[source], labels, inputs, source)
    kip = replace(distill.kip, seed=distill.seed)
    progress.start("kip steps", kip.steps)
    kip.fit(feature_map, inputs, labels, phi, outputs, classes, lambda _loss: progress.advance())
    with torch.no_grad():
        features = feature_map(kip.inputs_)
    jacobians = (kip.steps + 1) * len(source)
    return Support(features, kip.labels_.argmax(1), kip.labels_, kip.inputs_, source, kip.losses_, jacobians)


def _kinds(batch: Batch) -> str:
    """What the arrays of a batch hold, e.g. `input_ids (int64), attention_mask (int64)`."""
    return ", ".join(f"{name} ({str(a.dtype).removeprefix('torch.')})" for name, a in batch.arrays.items())


_SUPPORT_DIMS = {
    "labels": ("support", "class"),
    "classes": ("support",),
    "source": ("support",),
    "nearest_index": ("support", "rank"),
    "nearest_score": ("support", "rank"),
    "effective_rank_full": ("class",),
    "effective_rank_distilled": ("class",),
    "r_eps_full": ("class", "eps"),
    "r_eps_distilled": ("class", "eps"),
}


def _write_support(group: h5py.Group, support: Support, near: tuple[Tensor, Tensor], ranks: dict[str, Tensor]) -> None:
    """/distill's datasets: the support, its nearest real points and the per-class spectra (`_SUPPORT_DIMS`)."""
    if support.inputs is not None:
        dims = ("support", *("input",) * (support.inputs.dim() - 1))
        store.write_array(group, "inputs", support.inputs.detach().cpu().numpy(), dims)
    source = support.source if support.source is not None else near[0][:, 0]
    named = {"labels": support.labels, "classes": support.classes, "source": source}
    named |= {"nearest_index": near[0], "nearest_score": near[1], **ranks}
    for name, value in named.items():
        store.write_array(group, name, value.detach().cpu().numpy(), _SUPPORT_DIMS[name])
    if support.losses is not None:
        store.write_array(group, "loss", np.array(support.losses), ("step",))


def distill_support(
    run: h5py.File,
    model: nn.Module | ModelAdapter,
    spec: KernelSpec,
    distill: DistillSpec,
    train: Dataset,
    train_logits: Tensor,
    test: Tensor | Batch | None,
    budget: Budget,
    progress: Progress | None = None,
) -> dict:
    """Distil the training set into a support of m points; write /distill and /kernel/distilled (the support's
    kernel with the test set, m columns wide); return /distill's attrs.

    The features of every training point (N·K·d values, held in memory) give the per-class spectra, the selections,
    the gradient-space support and kip's targets.
    """
    progress = progress or Silent()
    began = time.perf_counter()
    device, x = budget.device, train.inputs
    if distill.method == "kip" and x.floating is None:
        raise UsageError(f"kip learns floating inputs, and these are {_kinds(x)}: use --method select or gradient")
    test = Batch.of(test) if test is not None else None
    features = featurizer(model, spec, x[:SKETCH_PROBE].to(device), budget)
    width = features.classes * spec.proj_dim
    rows = len(x) + (len(test) if test is not None else 0)
    if 3 * rows * width * features.dtype.itemsize > budget.bytes:
        raise OutOfMemoryError(f"distilling needs the {rows}×{width} projected features in memory: lower --proj-dim")
    tile = _tile_size(len(x), features.work_bytes, features.pair_bytes, budget)
    phi = _all_features(features, x, tile, device, progress, "train features")
    n_classes = train_logits.shape[1]
    classes = (train_logits.argmax(1) if distill.target == "model" else train.y).to(device)
    sizes = distill.sizes(torch.bincount(classes, minlength=n_classes).tolist())
    outputs = train_logits.to(device).softmax(1) - 1.0 / n_classes
    support = build_support(
        distill,
        lambda z: features.featurize(z).dense.reshape(len(z), -1),
        x,
        phi,
        classes,
        outputs,
        sizes,
        progress,
    )
    full_rank, full_r = class_ranks(phi, classes, n_classes, RANK_EPS)
    support_rank, support_r = class_ranks(support.features, support.classes, n_classes, RANK_EPS)
    ranks = {
        "effective_rank_full": full_rank,
        "effective_rank_distilled": support_rank,
        "r_eps_full": full_r,
        "r_eps_distilled": support_r,
    }
    group = run.create_group("distill")
    _write_support(group, support, nearest(support.features, phi, distill.neighbours), ranks)
    m = len(support.features)
    attrs = {
        "method": distill.method,
        "selection": distill.selection if distill.method != "gradient" else "",
        "kernel": spec.name,
        "target": distill.target,
        "n_train": len(x),
        "m": m,
        "per_class": sizes,
        "reduction": len(x) / m,
        "seed": distill.seed,
        "eps": list(RANK_EPS),
        "effective_rank_full": full_rank.tolist(),
        "effective_rank_distilled": support_rank.tolist(),
        **(distill.options()["kip"] if distill.method == "kip" else {}),
    }
    kernel = run.create_group("kernel/distilled")
    shape, dims = (features.classes, spec.proj_dim), ("output", "proj")
    sets = [("train", support.features)]
    if test is not None:
        test_phi = _all_features(features, test, tile, device, progress, "test features")
        unit_test = unit_rows(test_phi)
        full = predictor_kernel(unit_test, unit_rows(phi))
        distilled = predictor_kernel(unit_test, unit_rows(support.features))
        attrs["kernel_alignment"] = kernel_alignment(full, distilled)
        attrs["kernel_alignment_centred"] = kernel_alignment(centred(full), centred(distilled))
        sets.append(("test", test_phi))
    datasets = [
        store.write_array(kernel, f"features/{split}", values.reshape(-1, *shape).cpu().numpy(), (split, *dims))
        for split, values in sets
    ]
    _feature_kernel(kernel, "trace", datasets, 1, tile, True, budget, progress, features.dtype)
    store.write_array(kernel, "full_train", (phi @ support.features.T).cpu().numpy(), ("full", "train"))
    store.write_array(kernel, "diag_full", phi.square().sum(1).cpu().numpy(), ("full",))
    store.set_attrs(kernel, {**_kernel_attrs(spec, features, tile), "support": "distill"})
    jacobians = rows + support.jacobians
    attrs.update(jacobians=jacobians, seconds=round(time.perf_counter() - began, 3), complete=True)
    store.set_attrs(group, attrs)
    return attrs


NORMALIZATIONS = {
    "cosine": "K(x,x')/sqrt(K(x,x) K(x',x'))",
    "scale": "K(x,x')/mean_j K(x_j,x_j), the mean training self-kernel: raw structure, α on a fixed scale",
    "none": "K(x,x') as computed",
}


@dataclass(frozen=True)
class SurrogateSpec:
    """The surrogate fitted by `attribute`: its kind, penalty, targets and kernel normalisation."""

    kind: str = "kglm"
    alpha: float = 1e-4
    target: str = "model"
    normalize: str = "cosine"  # cosine | scale | none
    balanced: bool = False
    fit_on: str = "support"  # a distilled support's kGLM: on the support's labels, or on the N training points


def kernel_name(run: h5py.File, requested: str | None) -> str:
    """The kernel group to explain with: `requested`, else `trace`, else the only one."""
    names = list(run.get("kernel", {}))
    if requested is None:
        requested = "trace" if "trace" in names or len(names) != 1 else names[0]
    if requested not in names:
        raise BadInputError(f"no kernel {requested!r} in the run file (have: {', '.join(names) or 'none'})")
    if run[f"kernel/{requested}"].attrs.get("kernel") not in ("trace", "pseudo", "ck"):
        raise UsageError(f"--kernel {requested}: attribution needs a scalar kernel (trace, pseudo or ck)")
    return requested


def _fit(
    spec: SurrogateSpec,
    kernel: Kernel,
    train: h5py.Group,
    distilled: h5py.Group | None,
    device: torch.device,
    progress: Progress,
) -> KernelGLM | KernelRidge:
    """Fit on the training set's network logits (ridge) or predicted classes / labels (kGLM); on a distilled
    support, on its labels y_s (ridge) or their classes (kGLM)."""
    source = distilled if distilled is not None else train
    outputs = torch.from_numpy(source["labels" if distilled is not None else "nn_logits"][()]).to(device)
    if spec.kind == "ridge":
        return KernelRidge(spec.alpha).fit(kernel, outputs)
    if distilled is not None:
        targets = torch.from_numpy(distilled["classes"][()])
    else:
        targets = outputs.argmax(1) if spec.target == "model" else torch.from_numpy(train["labels"][()])
    glm = KernelGLM(spec.alpha, spec.balanced)
    progress.start("fit kGLM (L-BFGS evaluations)", glm.max_iter)
    return glm.fit(kernel, targets.to(device), outputs.shape[1], progress.advance)


def _train_kernel(group: h5py.Group, normalize: str, budget: Budget, rows: str = "train") -> Kernel:
    """The train×train kernel as the surrogate sees it: from the stored features Φ as the operator Φ̃Φ̃ᵀ when the
    kernel is projected to D < N dimensions (memory N·D), else read whole (memory N²). rows="full": the (N, m)
    kernel between all training points and a distilled support, read whole."""
    if rows == "full":
        n, m = group["full_train"].shape
        if n * m * 8 * 2 > budget.bytes:
            raise OutOfMemoryError(f"fitting needs {n}×{m} float64 values in memory: raise --max-memory")
        return torch.from_numpy(_kernel_rows(group, "full", 0, n, normalize)).double().to(budget.device)
    n = group["diag_train"].shape[0]
    width = min(n, int(np.prod(group["features/train"].shape[1:])) if "features" in group else n)
    if n * width * 8 * 2 > budget.bytes:
        raise OutOfMemoryError(f"fitting needs {n}×{width} float64 values in memory: raise --max-memory")
    if width == n:
        return torch.from_numpy(_kernel_rows(group, "train", 0, n, normalize)).double().to(budget.device)
    features = store.read_features(group["features/train"]).double().reshape(n, -1)
    diag = torch.from_numpy(group["diag_train"][()]).double()
    if normalize == "cosine":
        features = features * torch.where(diag > 0, diag.clamp_min(1e-300).rsqrt(), 0.0)[:, None]
    elif normalize == "scale":
        features = features / diag.mean().sqrt()
    return FeatureKernel(features.to(budget.device))


def _kernel_rows(group: h5py.Group, split: str, start: int, stop: int, normalize: str) -> np.ndarray:
    """Rows [start, stop) of the <split>×train kernel as the surrogate sees it (NORMALIZATIONS)."""
    rows = group[f"{split}_train"][start:stop]
    if normalize == "scale":
        return rows / group["diag_train"][()].mean()
    if normalize == "cosine":
        return store.cosine_normalize(rows, group[f"diag_{split}"][start:stop], group["diag_train"][()])
    return rows


def _stream_attribution(
    out: h5py.Group,
    fitted: h5py.Group,
    kernel: h5py.Group,
    split: str,
    surrogate: KernelGLM | KernelRidge,
    predicted: Tensor,
    spec: SurrogateSpec,
    budget: Budget,
    top_k: int,
    all_classes: bool,
    progress: Progress,
) -> np.ndarray:
    """Scores, top-k proponents and opponents of the <split>×train rows, and the surrogate's logits on them
    (/surrogate/logits_<split>), block by block, each block checkpointed on `scores`; blocks an interrupted run
    checkpointed (in the block size it recorded) are not computed again. Returns the logits s (M, C)."""
    m, n = kernel[f"{split}_train"].shape
    classes = surrogate.b_.shape[0]
    k = min(top_k, n)
    # about eight block-sized float64 temporaries: the read, normalisation, scores and their copies for writing
    rows = max(1, min(m, budget.bytes // (8 * n * (8 + (classes if all_classes else 0)))))
    if "scores" in out:
        rows = int(out["scores"].attrs["tile"])
    tiling = _tiling(rows, m)
    scores = _rows_dataset(out, "scores", (m, n), np.float64, (split, "train"), tiling, 1)
    scores.attrs["tile"] = rows
    by_class = (
        _rows_dataset(out, "scores_all", (m, n, classes), np.float64, (split, "train", "class"), tiling, 1)
        if all_classes
        else None
    )
    extreme_sets = [
        _rows_dataset(out, key, (m, k), dtype, (split, "rank"), tiling, 1)
        for key, dtype in (
            ("topk_index", np.int64),
            ("topk_score", np.float64),
            ("opp_index", np.int64),
            ("opp_score", np.float64),
        )
    ]
    logits = _rows_dataset(fitted, f"logits_{split}", (m, classes), np.float64, (split, "class"), tiling, 1)
    done = store.tiles_done(scores)
    progress.start(f"/attribution {split}×train", m)
    for index, start in enumerate(range(0, m, rows)):
        stop = min(m, start + rows)
        if index >= done:
            block = _kernel_rows(kernel, split, start, stop, spec.normalize)
            block = torch.from_numpy(block).double().to(budget.device)
            logits[start:stop] = surrogate.decision_function(block).cpu().numpy()
            values = attribution_scores(block, surrogate.W_, surrogate.b_, predicted[start:stop].to(budget.device))
            scores[start:stop] = values.cpu().numpy()
            if by_class is not None:
                by_class[start:stop] = all_class_scores(block, surrogate.W_, surrogate.b_).cpu().numpy()
            for dataset, value in zip(extreme_sets, extremes(values, k), strict=True):
                dataset[start:stop] = value.cpu().numpy()
            store.checkpoint(scores, index + 1)
        progress.advance(stop - start)
    if "class" not in out:
        store.write_array(out, "class", predicted.numpy(), (split,))
    store.set_attrs(out, {"orientation": f"({split}, train)", "class": "network prediction", "top_k": k})
    return logits[()]


def _start_surrogate(run: h5py.Group, surrogate: KernelGLM | KernelRidge, attrs: dict) -> h5py.Group:
    """/surrogate: W (C, N), b (C,) and how it was fitted, flushed: an interrupted attribute resumes from them."""
    group = run.create_group("surrogate")
    store.write_array(group, "W", surrogate.W_.cpu().numpy(), ("class", "train"))
    store.write_array(group, "b", surrogate.b_.cpu().numpy(), ("class",))
    store.set_attrs(group, attrs)
    store.mark(group, "fitted", True)  # removed when the attribute is done
    return group


def _restored(spec: SurrogateSpec, group: h5py.Group, device: torch.device) -> tuple[KernelGLM | KernelRidge, dict]:
    """The surrogate that an interrupted attribute fitted and stored in /surrogate, and the attributes of its fit."""
    surrogate = KernelRidge(spec.alpha) if spec.kind == "ridge" else KernelGLM(spec.alpha, spec.balanced)
    surrogate.W_ = torch.from_numpy(group["W"][()]).to(device)
    surrogate.b_ = torch.from_numpy(group["b"][()]).to(device)
    return surrogate, {key: value for key, value in store.attrs_dict(group).items() if key != "fitted"}


def _write_faithfulness(run: h5py.Group, metrics: dict, split: str, name: str) -> None:
    """/faithfulness: every metric as an attribute, and as a (names, table) pair of datasets."""
    group = run.create_group("faithfulness")
    store.set_attrs(group, {**metrics, "split": split, "kernel": name})
    store.write_array(group, "table", np.array(list(metrics.values()), dtype=np.float64), ("metric",))
    store.write_array(group, "names", np.array(list(metrics)), ("metric",))


def attribute_run(
    path: str,
    requested: str | None,
    spec: SurrogateSpec,
    budget: Budget,
    *,
    top_k: int = 10,
    all_classes: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Fit the surrogate on /kernel/<name>, write /surrogate, /attribution and /faithfulness.

    The fit holds the train×train kernel in memory (float64), or for a projected kernel only its features; the
    explained×train kernel and the scores stream in row blocks sized by the budget. Explained points are the test
    set, or the training set when there is none. On the distilled support (/kernel/distilled) the surrogate is fitted
    to the support's labels (fit_on="support") or, with the support as its basis, to the network on all N training
    points through the stored N×m kernel (fit_on="train"); its groups go under /distill, beside the full-data ones,
    and its faithfulness also holds the reduction N/m and the kernel alignments with the full-data predictor.

    An interrupt keeps the partial copy of the run file; `resume` continues it (the same request): the stored fit
    is reused and the row blocks already checkpointed are kept, giving the numbers of an uninterrupted run.
    """
    progress = progress or Silent()
    request = {"kernel": requested, **asdict(spec), "top_k": top_k, "all_classes": all_classes}
    with store.update_run(path, request=request, resume=resume) as (run, resumed):
        name = kernel_name(run, requested)
        group = run[f"kernel/{name}"]
        distilled = run["distill"] if group.attrs.get("support") == "distill" else None
        parent = distilled if distilled is not None else run
        # resumed: the groups are the interrupted run's (it removed earlier ones), kept when its fit was stored
        fitted = resumed and "surrogate" in parent and bool(parent["surrogate"].attrs.get("fitted", False))
        existing = [g for g in ("surrogate", "attribution", "faithfulness") if g in parent]
        if existing and not overwrite and not resumed:
            where = f"{parent.name.rstrip('/')}/{existing[0]}"
            raise BadInputError(f"{path} already has {where}; pass --overwrite to replace it")
        for g in existing:
            if not (fitted and g in ("surrogate", "attribution")):
                del parent[g]
        if distilled is None and spec.fit_on == "train":
            raise UsageError("--fit-on train applies to a distilled support: add --kernel distilled")
        on_train = distilled is not None and spec.fit_on == "train"
        if on_train and spec.kind != "kglm":
            raise UsageError("--fit-on train fits the kGLM: drop --surrogate ridge")
        split = "test" if "test_train" in group else "train"
        if distilled is not None and split != "test":
            raise BadInputError("a distilled support is explained on a test set: distil with --test")
        kernel = _train_kernel(group, spec.normalize, budget, "full" if on_train else "train")
        if fitted:
            surrogate, fit = _restored(spec, parent["surrogate"], budget.device)
        else:
            surrogate = _fit(spec, kernel, run["data/train"], None if on_train else distilled, budget.device, progress)
            fit = _fit_attrs(spec, surrogate, name, distilled is not None, on_train)
            _start_surrogate(parent, surrogate, fit)
        explained = run[f"data/{split}"]
        nn_logits = explained["nn_logits"][()]
        predicted = torch.from_numpy(nn_logits.argmax(1))
        out = parent.require_group("attribution")
        logits = _stream_attribution(
            out, parent["surrogate"], group, split, surrogate, predicted, spec, budget, top_k, all_classes, progress
        )
        out.attrs["kernel"] = name
        if split == "test":
            parent["surrogate"].pop("logits_train", None)  # an interrupted run may have written it
            train_logits = surrogate.decision_function(kernel).cpu().numpy()
            store.write_array(parent["surrogate"], "logits_train", train_logits, ("train", "class"))
        del parent["surrogate"].attrs["fitted"]
        metrics = faithfulness(nn_logits, logits, explained["labels"][()])
        if distilled is not None:
            metrics.update({key: distilled.attrs.get(key, np.nan) for key in DISTILL_METRICS})
        _write_faithfulness(parent, metrics, split, name)
    return {"kernel": name, "split": split, "surrogate": fit, "faithfulness": metrics}


def _fit_attrs(
    spec: SurrogateSpec, surrogate: KernelGLM | KernelRidge, name: str, distilled: bool, on_train: bool
) -> dict:
    """/surrogate's attributes: how it was fitted, and to what."""
    if distilled and not on_train:
        target = "distilled labels" if spec.kind == "ridge" else "distilled classes"
    else:
        target = "logits" if spec.kind == "ridge" else spec.target
    fit = {
        "kind": spec.kind,
        "alpha": spec.alpha,
        "target": target,
        "kernel": name,
        "normalize": spec.normalize,
        "class_weight": "balanced" if spec.balanced else "none",
        **({"fit_on": spec.fit_on} if distilled else {}),
    }
    if isinstance(surrogate, KernelGLM):
        fit.update(loss=surrogate.loss_, n_iter=surrogate.n_iter_, converged=surrogate.converged_)
    return fit
