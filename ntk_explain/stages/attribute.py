"""The attribute stage: kernel → surrogate → attribution scores and faithfulness in the run file.

The fit holds the train×train kernel in memory (float64), or for a projected kernel only its features; the
explained×train kernel and the scores stream in row blocks sized by the budget. Explained points are the test set, or
the training set when there is none. On a distilled support (/kernel/distilled) the surrogate is fitted to the
support's labels (fit_on="support") or, with the support as its basis, to the network on all N training points
through the stored N×m kernel (fit_on="train"); its groups go under /distill, beside the full-data ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ntk_explain import store
from ntk_explain.errors import BadInputError, OutOfMemoryError, UsageError
from ntk_explain.kernel.normalize import cosine_features, cosine_normalize
from ntk_explain.options import DISTILL_METRICS, AttributeSpec, Budget, Resources, SurrogateSpec
from ntk_explain.resources import budget as resolve_budget
from ntk_explain.stages.execution import Execution, Progress
from ntk_explain.stages.kernels import chunk_tile, rows_dataset
from ntk_explain.stages.resume import finished, kept_partial
from ntk_explain.stages.rows import resumable_tiles
from ntk_explain.store import layout
from ntk_explain.surrogate.attribution import all_class_scores, attribution_scores, extremes
from ntk_explain.surrogate.estimators import FeatureKernel, Kernel, KernelGLM, KernelRidge
from ntk_explain.surrogate.metrics import faithfulness

Surrogate = KernelGLM | KernelRidge
EXTREMES = (("topk_index", np.int64), ("topk_score", np.float64), ("opp_index", np.int64), ("opp_score", np.float64))


def kernel_name(run: store.H5File, requested: str | None) -> str:
    """The kernel group to explain with: `requested`, else `trace`, else the only one."""
    names = list(run.get(layout.KERNEL, {}))
    if requested is None:
        requested = "trace" if "trace" in names or len(names) != 1 else names[0]
    if requested not in names:
        raise BadInputError(f"no kernel {requested!r} in the run file (have: {', '.join(names) or 'none'})")
    if run[layout.kernel(requested)].attrs.get("kernel") not in ("trace", "pseudo", "ck"):
        raise UsageError(f"--kernel {requested}: attribution needs a scalar kernel (trace, pseudo or ck)")
    return requested


@dataclass
class _Target:
    """What is explained: the kernel group and its name, the group the explanation goes under (the root, or /distill
    for a distilled support), the explained split, and whether the kGLM of a support is fitted on all of train."""

    name: str
    kernel: store.H5Group
    parent: store.H5Group
    distilled: store.H5Group | None
    split: str
    on_train: bool


def _target(run: store.H5File, spec: AttributeSpec) -> _Target:
    name = kernel_name(run, spec.kernel)
    group = run[layout.kernel(name)]
    distilled = run[layout.DISTILL] if group.attrs.get("support") == layout.DISTILL else None
    surrogate = spec.surrogate
    if distilled is None and surrogate.fit_on == "train":
        raise UsageError("--fit-on train applies to a distilled support: add --kernel distilled")
    on_train = distilled is not None and surrogate.fit_on == "train"
    if on_train and surrogate.kind != "kglm":
        raise UsageError("--fit-on train fits the kGLM: drop --surrogate ridge")
    split = "test" if layout.block("test") in group else "train"
    if distilled is not None and split != "test":
        raise BadInputError("a distilled support is explained on a test set: distil with --test")
    return _Target(name, group, distilled if distilled is not None else run, distilled, split, on_train)


def _fit(
    spec: SurrogateSpec,
    kernel: Kernel,
    train: store.H5Group,
    distilled: store.H5Group | None,
    device: torch.device,
    progress: Progress,
) -> Surrogate:
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


def _train_kernel(group: store.H5Group, normalize: str, budget: Budget, rows: str = "train") -> Kernel:
    """The train×train kernel as the surrogate sees it: from the stored features Φ as the operator Φ̃Φ̃ᵀ when the
    kernel is projected to D < N dimensions (memory N·D), else read whole (memory N²). rows="full": the (N, m)
    kernel between all training points and a distilled support, read whole."""
    if rows == "full":
        n, m = group["full_train"].shape
        if n * m * 8 * 2 > budget.bytes:
            raise OutOfMemoryError(f"fitting needs {n}×{m} float64 values in memory: raise --max-memory")
        return torch.from_numpy(_kernel_rows(group, "full", 0, n, normalize)).double().to(budget.device)
    n, stored = group[layout.diag("train")].shape[0], layout.features("train")
    width = min(n, int(np.prod(group[stored].shape[1:])) if stored in group else n)
    if n * width * 8 * 2 > budget.bytes:
        raise OutOfMemoryError(f"fitting needs {n}×{width} float64 values in memory: raise --max-memory")
    if width == n:
        return torch.from_numpy(_kernel_rows(group, "train", 0, n, normalize)).double().to(budget.device)
    features = store.read_features(group[stored]).double().reshape(n, -1)
    diag = torch.from_numpy(group[layout.diag("train")][()]).double()
    if normalize == "cosine":
        features = cosine_features(features, diag)
    elif normalize == "scale":
        features = features / diag.mean().sqrt()
    return FeatureKernel(features.to(budget.device))


def _kernel_rows(group: store.H5Group, split: str, start: int, stop: int, normalize: str) -> np.ndarray:
    """Rows [start, stop) of the <split>×train kernel as the surrogate sees it (NORMALIZATIONS)."""
    rows, diag_train = group[layout.block(split)][start:stop], group[layout.diag("train")][()]
    if normalize == "scale":
        return rows / diag_train.mean()
    if normalize == "cosine":
        return cosine_normalize(rows, group[layout.diag(split)][start:stop], diag_train)
    return rows


def _score_datasets(
    out: store.H5Group, fitted: store.H5Group, shape: tuple[int, int, int], split: str, rows: int, spec: AttributeSpec
) -> tuple[store.H5Dataset, store.H5Dataset | None, list[store.H5Dataset], store.H5Dataset]:
    """The datasets of the attribution, (m, n, C) its shape, written in blocks of `rows`: the scores, those of every
    class (with all_classes), the extremes (`EXTREMES`) and the surrogate's logits."""
    (m, n, classes), tiled, k = shape, chunk_tile(rows, shape[0]), min(spec.top_k, shape[1])
    scores = rows_dataset(out, "scores", (m, n), np.float64, (split, "train"), tiled, 1)
    scores.attrs["tile"] = rows
    by_class = None
    if spec.all_classes:
        by_class = rows_dataset(out, "scores_all", (m, n, classes), np.float64, (split, "train", "class"), tiled, 1)
    extreme = [rows_dataset(out, key, (m, k), dtype, (split, "rank"), tiled, 1) for key, dtype in EXTREMES]
    logits = rows_dataset(fitted, f"logits_{split}", (m, classes), np.float64, (split, "class"), tiled, 1)
    return scores, by_class, extreme, logits


def _stream_attribution(
    target: _Target, surrogate: Surrogate, predicted: Tensor, spec: AttributeSpec, budget: Budget, progress: Progress
) -> np.ndarray:
    """Scores, top-k proponents and opponents of the <split>×train rows, and the surrogate's logits on them
    (/surrogate/logits_<split>), block by block, each block checkpointed on `scores`; blocks an interrupted run
    checkpointed (in the block size it recorded) are not computed again. Returns the logits s (M, C)."""
    out, split = target.parent.require_group(layout.ATTRIBUTION), target.split
    m, n = target.kernel[layout.block(split)].shape
    classes, k, device = surrogate.b_.shape[0], min(spec.top_k, n), budget.device
    # about eight block-sized float64 temporaries: the read, normalisation, scores and their copies for writing
    rows = max(1, min(m, budget.bytes // (8 * n * (8 + (classes if spec.all_classes else 0)))))
    rows = int(out["scores"].attrs["tile"]) if "scores" in out else rows
    fitted = target.parent[layout.SURROGATE]
    scores, by_class, extreme, logits = _score_datasets(out, fitted, (m, n, classes), split, rows, spec)
    for _, where in resumable_tiles(scores, m, rows, progress, f"/attribution {split}×train"):
        block = _kernel_rows(target.kernel, split, where.start, where.stop, spec.surrogate.normalize)
        block = torch.from_numpy(block).double().to(device)
        logits[where] = surrogate.decision_function(block).cpu().numpy()
        values = attribution_scores(block, surrogate.W_, surrogate.b_, predicted[where].to(device))
        scores[where] = values.cpu().numpy()
        if by_class is not None:
            by_class[where] = all_class_scores(block, surrogate.W_, surrogate.b_).cpu().numpy()
        for dataset, value in zip(extreme, extremes(values, k), strict=True):
            dataset[where] = value.cpu().numpy()
    if "class" not in out:
        store.write_array(out, "class", predicted.numpy(), (split,))
    store.set_attrs(out, {"orientation": f"({split}, train)", "class": "network prediction", "top_k": k})
    out.attrs["kernel"] = target.name
    return logits[()]


def _start_surrogate(parent: store.H5Group, surrogate: Surrogate, attrs: dict) -> None:
    """/surrogate: W (C, N), b (C,) and how it was fitted, flushed: an interrupted attribute resumes from them."""
    group = parent.create_group(layout.SURROGATE)
    store.write_array(group, "W", surrogate.W_.cpu().numpy(), ("class", "train"))
    store.write_array(group, "b", surrogate.b_.cpu().numpy(), ("class",))
    store.set_attrs(group, attrs)
    store.mark(group, "fitted", True)  # removed when the attribute is done


def _restored(spec: SurrogateSpec, group: store.H5Group, device: torch.device) -> tuple[Surrogate, dict]:
    """The surrogate that an interrupted attribute fitted and stored in /surrogate, and the attributes of its fit."""
    surrogate = KernelRidge(spec.alpha) if spec.kind == "ridge" else KernelGLM(spec.alpha, spec.balanced)
    surrogate.W_ = torch.from_numpy(group["W"][()]).to(device)
    surrogate.b_ = torch.from_numpy(group["b"][()]).to(device)
    return surrogate, {key: value for key, value in store.attrs_dict(group).items() if key != "fitted"}


def _write_faithfulness(parent: store.H5Group, metrics: dict, split: str, name: str) -> None:
    """/faithfulness: every metric as an attribute, and as a (names, table) pair of datasets."""
    group = parent.create_group(layout.FAITHFULNESS)
    store.set_attrs(group, {**metrics, "split": split, "kernel": name})
    store.write_array(group, "table", np.array(list(metrics.values()), dtype=np.float64), ("metric",))
    store.write_array(group, "names", np.array(list(metrics)), ("metric",))


def _cleared(parent: store.H5Group, resumed: bool, overwrite: bool, path: Path) -> bool:
    """Remove an earlier explanation under `parent` (only with overwrite); keep an interrupted run's fit and scores
    when resuming one whose fit was stored. Whether that fit is there."""
    fitted = resumed and layout.SURROGATE in parent and bool(parent[layout.SURROGATE].attrs.get("fitted", False))
    existing = [name for name in layout.EXPLANATION if name in parent]
    if existing and not overwrite and not resumed:
        where = f"{parent.name.rstrip('/')}/{existing[0]}"
        raise BadInputError(f"{path} already has {where}; pass --overwrite to replace it")
    for name in existing:
        if not (fitted and name in (layout.SURROGATE, layout.ATTRIBUTION)):
            del parent[name]
    return fitted


def attribute(path: str | Path, spec: AttributeSpec, resources: Resources, how: Execution = Execution()) -> dict:
    """Fit the surrogate on /kernel/<name>, write /surrogate, /attribution and /faithfulness (under /distill for a
    distilled support, whose faithfulness also holds the reduction N/m and the kernel alignments with the full-data
    predictor). An interrupt keeps the partial copy of the run file; `how.resume` continues it (the same request):
    the stored fit is reused and the row blocks already checkpointed are kept, giving the numbers of an uninterrupted
    run."""
    path = Path(path)
    if how.resume and finished(path, _surrogate_group(path, spec), spec.to_params(), how):
        return {"out": str(path), "skipped": True}
    budget = resolve_budget(resources)
    try:
        return _attribute(path, spec, budget, how)
    except KeyboardInterrupt:
        raise kept_partial(path) from None


def _surrogate_group(path: Path, spec: AttributeSpec) -> str:
    """Where the surrogate of `spec` goes: /surrogate, or /distill/surrogate for a distilled support."""
    with store.open_run(path) as run:
        return layout.within(_target(run, spec).parent.name.strip("/"), layout.SURROGATE)


def _attribute(path: Path, spec: AttributeSpec, budget: Budget, how: Execution) -> dict:
    progress, surrogate_spec = how.progress, spec.surrogate
    with store.update_run(path, request=spec.to_params(), resume=how.resume) as (run, resumed):
        target = _target(run, spec)
        fitted = _cleared(target.parent, resumed, how.overwrite, path)
        kernel = _train_kernel(target.kernel, surrogate_spec.normalize, budget, "full" if target.on_train else "train")
        if fitted:
            surrogate, fit = _restored(surrogate_spec, target.parent[layout.SURROGATE], budget.device)
        else:
            support = None if target.on_train else target.distilled
            surrogate = _fit(surrogate_spec, kernel, run[layout.data("train")], support, budget.device, progress)
            fit = _fit_attrs(surrogate_spec, surrogate, target.name, target.distilled is not None, target.on_train)
            _start_surrogate(target.parent, surrogate, fit)
        explained = run[layout.data(target.split)]
        nn_logits = explained["nn_logits"][()]
        logits = _stream_attribution(target, surrogate, torch.from_numpy(nn_logits.argmax(1)), spec, budget, progress)
        fitted_group = target.parent[layout.SURROGATE]
        if target.split == "test":
            fitted_group.pop("logits_train", None)  # an interrupted run may have written it
            train_logits = surrogate.decision_function(kernel).cpu().numpy()
            store.write_array(fitted_group, "logits_train", train_logits, ("train", "class"))
        del fitted_group.attrs["fitted"]
        store.set_attrs(fitted_group, {"request": spec.to_params()})  # what `finished` compares
        metrics = faithfulness(nn_logits, logits, explained["labels"][()])
        if target.distilled is not None:
            metrics.update({key: target.distilled.attrs.get(key, np.nan) for key in DISTILL_METRICS})
        _write_faithfulness(target.parent, metrics, target.split, target.name)
    return {"kernel": target.name, "split": target.split, "surrogate": fit, "faithfulness": metrics}


def _fit_attrs(spec: SurrogateSpec, surrogate: Surrogate, name: str, distilled: bool, on_train: bool) -> dict:
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
