"""The distill stage: the training set's projected features → a support of m ≪ N points → /distill and the support's
kernel with the test set (/kernel/distilled).

It is resumable: the projected features of every point (tile by tile) and kip's state (every `KIP_CHECKPOINT` steps)
are kept in a scratch file beside the run file until the stage is done, so that `--resume` after an interrupt or a
kill goes on from them, to the numbers of an uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from ntk_explain import store
from ntk_explain.distillation.kip import KIP, KipTargets
from ntk_explain.distillation.spectra import centred, class_ranks, kernel_alignment, nearest, predictor_kernel
from ntk_explain.distillation.support import allocate, centred_one_hot, gradient_support, select
from ntk_explain.errors import BadInputError, OutOfMemoryError, UsageError
from ntk_explain.features.featurizer import SKETCH_PROBE, Featurizer, featurizer
from ntk_explain.kernel.normalize import unit_rows
from ntk_explain.loading.adapter import Batch
from ntk_explain.options import DEFAULT_REDUCTION, Budget, DistillSpec, InputSpec, KernelSpec, Resources
from ntk_explain.resources import budget as resolve_budget
from ntk_explain.stages.distill_state import load_kip, save_kip, stored_features
from ntk_explain.stages.execution import Execution, Progress
from ntk_explain.stages.inputs import HASHES, Inputs, load_inputs
from ntk_explain.stages.kernels import feature_kernel, kernel_attrs, network_logits, tile_size, write_data
from ntk_explain.stages.resume import finished, kept_partial, resumed_resources
from ntk_explain.store import layout

RANK_EPS = (0.01, 0.05)
KIP_CHECKPOINT = 10  # kip steps between checkpoints


def distill(
    inputs: InputSpec,
    kernel: KernelSpec,
    spec: DistillSpec,
    out: Path,
    resources: Resources,
    how: Execution = Execution(),
    export: Path | None = None,
) -> dict:
    """Distil the training set of `inputs` into a support (`spec`) on the projected `kernel`; write /distill and
    /kernel/distilled into `out` (new, or a run file of the same model and data), and the support to `export`
    (safetensors) when given. An interrupt keeps the partial file and the scratch state; `how.resume` continues."""
    spec.check_kernel(kernel)
    overwrite, resume = how.overwrite, how.resume
    if export is not None:
        store.check_target(export, overwrite=overwrite)
    budget = resolve_budget(resumed_resources(resources, out) if resume else resources)
    options = {"kernel": [kernel.name], "projection": kernel.projection, "proj_dim": kernel.proj_dim}
    loaded = load_inputs(inputs, budget, {**options, "distill": spec.to_params()}, kernel.seed)
    request = {
        "inputs": inputs.to_params(),
        "kernel": kernel.to_params(),
        "distill": spec.to_params(),
        **{key: loaded.attrs[key] for key in HASHES},
    }
    if finished(out, layout.DISTILL, request, how):
        summary = {"out": str(out), "skipped": True}
    else:
        summary = _distill(out, loaded, kernel, spec, request, how)
    if export is not None:
        export_support(out, export)
    return summary


def _distill(out: Path, loaded: Inputs, kernel: KernelSpec, spec: DistillSpec, request: dict, how: Execution) -> dict:
    overwrite, resume = how.overwrite, how.resume
    try:
        with distill_target(out, loaded, overwrite, request, resume) as run:
            with store.scratch(out, request, resume=resume) as scratch:
                summary = distill_support(run, scratch, loaded, kernel, spec, how.progress)
            recorded = {key: loaded.attrs[key] for key in ("command", "params", "created")}
            store.set_attrs(run[layout.DISTILL], {**recorded, "request": request})
    except KeyboardInterrupt:
        raise kept_partial(out) from None
    return {"out": str(out), **summary}


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
    scratch: store.H5File | None = None,
) -> Support:
    """The support of `distill.method` from the training inputs x (N, …, any device), their features φ (N, K·d),
    classes and network outputs y_t (N, C) (kip's targets); `feature_map` gives the (differentiable) features of
    inputs. Only the chosen rows of x move to φ's device. kip checkpoints its state in `scratch`, and starts from the
    state found there."""
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
    state = load_kip(scratch) if scratch is not None else None
    progress.start("kip steps", kip.steps)
    progress.advance(state.step if state is not None else 0)
    checkpoint = (lambda kept: save_kip(scratch, kept)) if scratch is not None else None
    on_step = lambda _loss: progress.advance()  # noqa: E731
    targets = KipTargets(phi, outputs, classes)
    kip.fit(feature_map, (inputs, labels), targets, on_step, state=state, checkpoint=checkpoint, every=KIP_CHECKPOINT)
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


def _write_support(
    group: store.H5Group, support: Support, near: tuple[Tensor, Tensor], ranks: dict[str, Tensor]
) -> None:
    """The datasets of /distill: the support, its nearest real points and the per-class spectra (`_SUPPORT_DIMS`)."""
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


@dataclass
class _Features:
    """The featurizer of the distilled kernel, its tile, and the projected features of train (and test)."""

    featurizer: Featurizer
    tile: int
    train: Tensor
    test: Tensor | None


def _features(scratch: store.H5File, loaded: Inputs, kernel: KernelSpec, progress: Progress) -> _Features:
    """Every point's projected features, flattened (n, K·d), kept in the scratch file tile by tile."""
    budget, x = loaded.budget, loaded.data["train"].inputs
    test = loaded.data["test"].inputs if "test" in loaded.data else None
    features = featurizer(loaded.net, kernel, x[:SKETCH_PROBE].to(budget.device), budget)
    width, rows = features.classes * kernel.proj_dim, len(x) + (len(test) if test is not None else 0)
    if 3 * rows * width * features.dtype.itemsize > budget.bytes:
        raise OutOfMemoryError(f"distilling needs the {rows}×{width} projected features in memory: lower --proj-dim")
    tile = tile_size(len(x), features, budget)
    phi = stored_features(scratch, "train", features, x, width, tile, budget, progress)
    test_phi = None if test is None else stored_features(scratch, "test", features, test, width, tile, budget, progress)
    return _Features(features, tile, phi, test_phi)


def distill_support(
    run: store.H5File,
    scratch: store.H5File,
    loaded: Inputs,
    kernel: KernelSpec,
    distill: DistillSpec,
    progress: Progress,
) -> dict:
    """Distil the training set into a support of m points; write /distill and /kernel/distilled (the support's
    kernel with the test set, m columns wide); return /distill's attrs.

    The features of every training point (N·K·d values, held in memory) give the per-class spectra, the selections,
    the gradient-space support and kip's targets."""
    began, train = time.perf_counter(), loaded.data["train"]
    if distill.method == "kip" and train.inputs.floating is None:
        kinds = _kinds(train.inputs)
        raise UsageError(f"kip learns floating inputs, and these are {kinds}: use --method select or gradient")
    found = _features(scratch, loaded, kernel, progress)
    logits = torch.from_numpy(run[layout.data("train")]["nn_logits"][()])
    device, n_classes = loaded.budget.device, logits.shape[1]
    classes = (logits.argmax(1) if distill.target == "model" else train.y).to(device)
    sizes = support_sizes(distill, torch.bincount(classes, minlength=n_classes).tolist())
    outputs = logits.to(device).softmax(1) - 1.0 / n_classes

    def feature_map(z: Tensor) -> Tensor:
        return found.featurizer.featurize(z).dense.reshape(len(z), -1)

    support = build_support(distill, feature_map, train.inputs, found.train, classes, outputs, sizes, progress, scratch)
    attrs = _write_distill(run, support, found.train, classes, n_classes, distill, kernel, sizes)
    attrs |= _write_distilled_kernel(run, found, support, kernel, loaded.budget, progress)
    attrs.update(jacobians=len(found.train) + (0 if found.test is None else len(found.test)) + support.jacobians)
    attrs.update(seconds=round(time.perf_counter() - began, 3), complete=True)
    store.set_attrs(run[layout.DISTILL], attrs)
    return attrs


def _write_distill(
    run: store.H5File,
    support: Support,
    phi: Tensor,
    classes: Tensor,
    n_classes: int,
    distill: DistillSpec,
    kernel: KernelSpec,
    sizes: list[int],
) -> dict:
    """The /distill group: the support, its nearest real points and the per-class spectra; its attributes, so far."""
    full_rank, full_r = class_ranks(phi, classes, n_classes, RANK_EPS)
    support_rank, support_r = class_ranks(support.features, support.classes, n_classes, RANK_EPS)
    ranks = {
        "effective_rank_full": full_rank,
        "effective_rank_distilled": support_rank,
        "r_eps_full": full_r,
        "r_eps_distilled": support_r,
    }
    _write_support(run.create_group(layout.DISTILL), support, nearest(support.features, phi, distill.neighbours), ranks)
    m = len(support.features)
    return {
        "method": distill.method,
        "selection": distill.selection if distill.method != "gradient" else "",
        "kernel": kernel.name,
        "target": distill.target,
        "n_train": len(phi),
        "m": m,
        "per_class": sizes,
        "reduction": len(phi) / m,
        "seed": distill.seed,
        "eps": list(RANK_EPS),
        "effective_rank_full": full_rank.tolist(),
        "effective_rank_distilled": support_rank.tolist(),
        **(asdict(distill.kip) if distill.method == "kip" else {}),
    }


def _write_distilled_kernel(
    run: store.H5File, found: _Features, support: Support, kernel: KernelSpec, budget: Budget, progress: Progress
) -> dict:
    """/kernel/distilled: the support's features and kernel with the test set, and the N×m kernel of every training
    point with the support; the kernel alignments of the two predictors' test×test kernels (those of /distill)."""
    group = run.create_group(layout.kernel(layout.DISTILLED))
    shape, dims = (found.featurizer.classes, kernel.proj_dim), ("output", "proj")
    sets, attrs = [("train", support.features)], {}
    if found.test is not None:
        unit_test = unit_rows(found.test)
        full = predictor_kernel(unit_test, unit_rows(found.train))
        distilled = predictor_kernel(unit_test, unit_rows(support.features))
        attrs["kernel_alignment"] = kernel_alignment(full, distilled)
        attrs["kernel_alignment_centred"] = kernel_alignment(centred(full), centred(distilled))
        sets.append(("test", found.test))
    datasets = [
        store.write_array(group, layout.features(split), values.reshape(-1, *shape).cpu().numpy(), (split, *dims))
        for split, values in sets
    ]
    feature_kernel(group, "trace", datasets, 1, found.tile, True, budget, progress, found.featurizer.dtype)
    store.write_array(group, "full_train", (found.train @ support.features.T).cpu().numpy(), ("full", "train"))
    store.write_array(group, "diag_full", found.train.square().sum(1).cpu().numpy(), ("full",))
    store.set_attrs(group, {**kernel_attrs(kernel, found.featurizer, found.tile), "support": layout.DISTILL})
    return attrs


@contextmanager
def distill_target(out: Path, loaded: Inputs, overwrite: bool, request: dict, resume: bool) -> Iterator[store.H5File]:
    """A new run file, or an existing one of the same model and data, whose /distill is replaced only with
    --overwrite; either resumable after an interrupt (the groups an interrupted run left are written again)."""
    store.check_target(out, overwrite=True)
    if not out.exists():
        with store.create_run(out, overwrite=False, attrs=loaded.attrs, resumable=True, resume=resume) as run:
            for split, dataset in loaded.data.items():
                write_data(run, split, dataset, network_logits(loaded.net, dataset.inputs, loaded.budget))
            _clear(run, out, overwrite=True)
            yield run
        return
    with store.update_run(out, request=request, resume=resume) as (run, resumed):
        for key in ("model_sha256", "weights_sha256"):
            if run.attrs.get(key) != loaded.attrs[key]:
                raise BadInputError(f"{out} was made with another model or weights; distil into a new --out")
        for split, dataset in loaded.data.items():
            group = run.get(layout.data(split))
            if group is None or group.attrs.get("sha256") != dataset.sha256:
                raise BadInputError(f"{out} holds other {split} data; distil into a new --out")
        _clear(run, out, overwrite=overwrite or resumed)
        yield run


def _clear(run: store.H5File, out: Path, overwrite: bool) -> None:
    """Remove /distill and /kernel/distilled (only with overwrite)."""
    for name in (layout.DISTILL, layout.kernel(layout.DISTILLED)):
        if name in run and not overwrite:
            raise BadInputError(f"{out} already has /{name}; pass --overwrite to replace it")
        if name in run:
            del run[name]


def export_support(run: Path, path: Path) -> None:
    """The support as safetensors: inputs (kip, select), features, labels, classes and source rows."""
    with store.open_run(run) as f:
        group = f[layout.DISTILL]
        tensors = {
            key: torch.from_numpy(group[key][()]) for key in ("inputs", "labels", "classes", "source") if key in group
        }
        tensors["features"] = torch.from_numpy(f[layout.kernel(layout.DISTILLED)][layout.features("train")][()])
    partial = store.partial_path(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
