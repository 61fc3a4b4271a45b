"""The attribute stage: kernel → surrogate → attribution scores and faithfulness in the run file."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from ntk_explain import store
from ntk_explain.errors import BadInputError, OutOfMemoryError, UsageError
from ntk_explain.kernel.normalize import cosine_normalize
from ntk_explain.options import DISTILL_METRICS, Budget, SurrogateSpec
from ntk_explain.resources import memory_budget, resolve_device
from ntk_explain.stages.compute import kept_partial
from ntk_explain.stages.kernels import chunk_tile, rows_dataset
from ntk_explain.stages.progress import Progress, Silent
from ntk_explain.surrogate.attribution import all_class_scores, attribution_scores, extremes
from ntk_explain.surrogate.estimators import FeatureKernel, Kernel, KernelGLM, KernelRidge
from ntk_explain.surrogate.metrics import faithfulness


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
        return cosine_normalize(rows, group[f"diag_{split}"][start:stop], group["diag_train"][()])
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
    tiling = chunk_tile(rows, m)
    scores = rows_dataset(out, "scores", (m, n), np.float64, (split, "train"), tiling, 1)
    scores.attrs["tile"] = rows
    by_class = (
        rows_dataset(out, "scores_all", (m, n, classes), np.float64, (split, "train", "class"), tiling, 1)
        if all_classes
        else None
    )
    extreme_sets = [
        rows_dataset(out, key, (m, k), dtype, (split, "rank"), tiling, 1)
        for key, dtype in (
            ("topk_index", np.int64),
            ("topk_score", np.float64),
            ("opp_index", np.int64),
            ("opp_score", np.float64),
        )
    ]
    logits = rows_dataset(fitted, f"logits_{split}", (m, classes), np.float64, (split, "class"), tiling, 1)
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


def run_attribute(
    run: Path,
    *,
    kernel: str | None = None,
    surrogate: str = "kglm",
    target: str = "model",
    alpha: float = 1e-4,
    normalize: str = "cosine",
    class_weight: str = "none",
    fit_on: str = "support",
    top_k: int = 10,
    all_classes: bool = False,
    device: str = "auto",
    max_memory: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Fit the surrogate on a run file's kernel and add attribution and faithfulness to it. An interrupt keeps the
    partial copy of the run file; `resume` continues it."""
    if not alpha > 0:
        raise UsageError("--alpha must be positive")
    torch_device = resolve_device(device)
    budget = Budget(torch_device, memory_budget(torch_device, max_memory))
    spec = SurrogateSpec(surrogate, alpha, target, normalize, class_weight == "balanced", fit_on)
    try:
        return attribute_run(
            str(run),
            kernel,
            spec,
            budget,
            top_k=top_k,
            all_classes=all_classes,
            overwrite=overwrite,
            resume=resume,
            progress=progress,
        )
    except KeyboardInterrupt:
        raise kept_partial(run) from None
