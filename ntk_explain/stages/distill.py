"""The distill stage: the training set's projected features → a support of m ≪ N points → /distill and the support's
kernel with the test set."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ntk_explain import store
from ntk_explain.distill.kip import KIP
from ntk_explain.distill.spectra import centred, class_ranks, kernel_alignment, nearest, predictor_kernel, unit_rows
from ntk_explain.distill.support import allocate, centred_one_hot, gradient_support, select
from ntk_explain.errors import BadInputError, OutOfMemoryError, UsageError
from ntk_explain.features.featurizer import SKETCH_PROBE, Featurizer, featurizer
from ntk_explain.loading.adapter import Batch, ModelAdapter
from ntk_explain.loading.data import Dataset
from ntk_explain.options import DEFAULT_REDUCTION, Budget, DistillSpec, KernelSpec
from ntk_explain.stages.inputs import Inputs
from ntk_explain.stages.kernels import (
    feature_kernel,
    feature_tiles,
    kernel_attrs,
    network_logits,
    tile_size,
    write_data,
)
from ntk_explain.stages.progress import Progress, Silent

RANK_EPS = (0.01, 0.05)


def _all_features(
    features: Featurizer, x: Batch, tile: int, device: torch.device, progress: Progress, description: str
) -> Tensor:
    """Projected features of every row of x, flattened to (n, K·d): the trace kernel is their inner product."""
    return torch.cat(
        [
            values.reshape(len(values), -1)
            for _, values in feature_tiles(features, x, tile, device, progress, description)
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
    kip = KIP(**asdict(distill.kip), seed=distill.seed)
    progress.start("kip steps", kip.steps)
    kip.fit(feature_map, inputs, labels, phi, outputs, classes, lambda _loss: progress.advance())
    with torch.no_grad():
        features = feature_map(kip.inputs_)
    jacobians = (kip.steps + 1) * len(source)
    return Support(features, kip.labels_.argmax(1), kip.labels_, kip.inputs_, source, kip.losses_, jacobians)


def support_sizes(distill: DistillSpec, class_sizes: list[int]) -> list[int]:
    """m_c of every class: per_class each (at most n_c), or N/reduction split in proportion to the classes."""
    if distill.per_class is not None:
        return [min(n, distill.per_class) for n in class_sizes]
    return allocate(class_sizes, round(sum(class_sizes) / (distill.reduction or DEFAULT_REDUCTION)))


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
    tile = tile_size(len(x), features.work_bytes, features.pair_bytes, budget)
    phi = _all_features(features, x, tile, device, progress, "train features")
    n_classes = train_logits.shape[1]
    classes = (train_logits.argmax(1) if distill.target == "model" else train.y).to(device)
    sizes = support_sizes(distill, torch.bincount(classes, minlength=n_classes).tolist())
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
    feature_kernel(kernel, "trace", datasets, 1, tile, True, budget, progress, features.dtype)
    store.write_array(kernel, "full_train", (phi @ support.features.T).cpu().numpy(), ("full", "train"))
    store.write_array(kernel, "diag_full", phi.square().sum(1).cpu().numpy(), ("full",))
    store.set_attrs(kernel, {**kernel_attrs(spec, features, tile), "support": "distill"})
    jacobians = rows + support.jacobians
    attrs.update(jacobians=jacobians, seconds=round(time.perf_counter() - began, 3), complete=True)
    store.set_attrs(group, attrs)
    return attrs


@contextmanager
def distill_target(out: Path, inputs: Inputs, overwrite: bool) -> Iterator[h5py.File]:
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


def export_support(run: Path, path: Path) -> None:
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
