"""The path-kernel stage: a recorded trajectory → every training point's exact contribution to each explained
prediction (`analyses.path`), into /path of a new run file or of an existing run of the same model and data.

Explained points are the test set (the training set without one), in row tiles under the memory budget, each tile
checkpointed: a killed run resumed gives the numbers of an uninterrupted one. When the run holds /attribution (the
kGLM's explanation), each point's rank agreement with it (Kendall τ, top-10 overlap) is stored beside.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import Tensor

from ntk_explain import resources as devices
from ntk_explain import store
from ntk_explain.analyses.path import TileExplanation, empty_explanation, explain_tile
from ntk_explain.analyses.segments import Quadrature, panel_tolerance
from ntk_explain.errors import BadInputError, OutOfMemoryError
from ntk_explain.features.plan import TangentPlan
from ntk_explain.features.projections import Projection
from ntk_explain.loading.adapter import Batch
from ntk_explain.loading.files import sha256_file
from ntk_explain.options import Budget, InputSpec, PathSpec, Resources, Shard
from ntk_explain.stages import distributed
from ntk_explain.stages.attribute import EXTREMES
from ntk_explain.stages.execution import Execution
from ntk_explain.stages.inputs import HASHES, Inputs, load_inputs
from ntk_explain.stages.kernels import network_logits, rows_dataset, write_data
from ntk_explain.stages.path_steps import Window, check_trajectory, steps, tangent_plan, weights_state, window
from ntk_explain.stages.resume import finished, kept_partial, resumed_resources
from ntk_explain.stages.rows import resumable_tiles
from ntk_explain.store import layout
from ntk_explain.store.trajectory import Trajectory
from ntk_explain.surrogate.attribution import extremes

AGREEMENT_TOP = 10  # the top-k overlap of the agreement with the kGLM explanation


@dataclass
class _Work:
    """What the tiles share: the loaded inputs, the trajectory and its window, the explained split, the values at
    the window's ends (M, C), the quadrature, the tangent plan, and the rows per tile, Jacobians per pass and points
    per JVP."""

    loaded: Inputs
    trajectory: Trajectory
    span: Window
    split: str
    f_start: Tensor
    f_stop: Tensor
    quadrature: Quadrature
    tolerance: Tensor
    tangents: TangentPlan
    tile: int
    chunk: int
    pairs: int


def _sizes(
    n: int, n_train: int, classes: int, explained: int, n_params: int, width: int, itemsize: int, budget: Budget
) -> tuple[int, int, int]:
    """Rows per tile, Jacobians per pass and points per JVP: a tile keeps five T×K×W accumulators (K: the `explained`
    classes, 1 or C; W: P, or the projection's rows) and its T×N×K contributions in half the budget (and, under
    torchrun, is at most a rank's share of the rows unless --tile says); a pass of Jacobians (chunk×C×P, about three
    times over) an eighth, and a JVP of points with their own weights (pairs×P, about four times over) another."""
    per_jacobian = classes * n_params * itemsize
    chunk, pairs = budget.bytes // (8 * 3 * per_jacobian), budget.bytes // (8 * 4 * n_params * itemsize)
    tile = budget.bytes // (2 * explained * (5 * width + n_train) * itemsize)
    if min(chunk, pairs, tile) < 1:
        raise OutOfMemoryError(f"one Jacobian ({per_jacobian / 2**20:.0f} MiB) does not fit; raise --max-memory")
    tile = budget.tile or min(tile, -(-n // budget.shard.world))  # under torchrun, a tile for each rank at least
    return min(tile, n), int(min(chunk, 1024)), int(min(pairs, 4096))


def _end_values(trajectory: Trajectory, loaded: Inputs, inputs: Batch, step: int, dtype: torch.dtype) -> Tensor:
    """f_{w_step}(x) (M, C) of the explained points, on the CPU."""
    device, batch = loaded.budget.device, loaded.budget.batch_size or 1024
    state = weights_state(trajectory, step, device, dtype)
    with torch.no_grad():
        rows = range(0, len(inputs), batch)
        return torch.cat([loaded.net.functional(state, inputs[s : s + batch].to(device, dtype)).cpu() for s in rows])


def path_kernel(
    inputs: InputSpec,
    spec: PathSpec,
    out: Path,
    resources: Resources,
    how: Execution = Execution(),
    *,
    into: bool = False,
) -> dict:
    """Write /path: the contributions of every training point to each explained point's logits over the recorded
    trajectory `spec.trajectory` (whose final weights must be the model's), the path kernel, the values at the
    window's ends, the weight-decay part, the identity's residual per point and per step, and the top-k proponents
    and opponents; into the new run file `out`, or (`into`) the existing run `out` of the same model and data.
    Returns a summary. An interrupt keeps the partial file; `how.resume` continues it."""
    shard = Shard.from_environment()
    if not into:
        store.check_target(out, overwrite=how.overwrite or how.resume)
    resumed = how.resume and not into  # a new run's partial file records its budget; /path its sizes (`_kept_sizes`)
    budget = devices.budget(resumed_resources(resources, out) if resumed else resources, shard)
    loaded = load_inputs(inputs, budget, {"path": spec.to_params()}, 0)
    dtype = getattr(torch, inputs.dtype)
    with Trajectory(spec.trajectory) as trajectory:
        train = loaded.data["train"]
        check_trajectory(trajectory, loaded.net, len(train.inputs))
        span = window(trajectory, spec.steps)
        request = {
            "inputs": inputs.to_params(),
            "path": spec.to_params(),
            "trajectory_sha256": sha256_file(spec.trajectory),
            **{key: loaded.attrs[key] for key in HASHES},
        }
        skipped = finished(out, layout.PATH, request, how)
        distributed.start(shard, budget.device)
        try:
            distributed.barrier(shard)  # every rank has read the file before rank 0 writes it
            if skipped:
                return {"out": str(out), "skipped": True}
            work = _work(loaded, trajectory, span, spec, dtype)
            began = time.perf_counter()
            if shard.rank > 0:
                summary = _serve(work, spec, shard)
            else:
                try:
                    write = _into if into else _new
                    summary = write(out, work, spec, request, how, shard)
                except KeyboardInterrupt:
                    raise kept_partial(out) from None
        finally:
            distributed.stop(shard)
    return {"out": str(out), **summary, "seconds": round(time.perf_counter() - began, 3)}


def _work(loaded: Inputs, trajectory: Trajectory, span: Window, spec: PathSpec, dtype: torch.dtype) -> _Work:
    split = "test" if "test" in loaded.data else "train"
    explained = loaded.data[split].inputs
    f_start = _end_values(trajectory, loaded, explained, span.start, dtype)
    f_stop = _end_values(trajectory, loaded, explained, span.stop, dtype)
    relative = spec.relative_tolerance(str(dtype).removeprefix("torch."))
    tolerance = panel_tolerance(f_start, f_stop, span.size, relative)
    n_params = sum(int(np.prod(shape)) for shape in trajectory.header.shapes)
    itemsize = torch.finfo(dtype).bits // 8
    classes = f_stop.shape[1]
    tile, chunk, pairs = _sizes(
        len(explained),
        len(loaded.data["train"].inputs),
        classes,
        classes if spec.all_classes else 1,
        n_params,
        n_params if spec.projection == "none" else spec.proj_dim,
        itemsize,
        loaded.budget,
    )
    quadrature = Quadrature(spec.nodes, spec.depth, spec.panels)
    probe = loaded.data["train"].inputs[:2].to(loaded.budget.device, dtype)
    tangents = tangent_plan(trajectory, loaded.net, probe, loaded.budget.bytes // 4)
    return _Work(loaded, trajectory, span, split, f_start, f_stop, quadrature, tolerance, tangents, tile, chunk, pairs)


def _new(out: Path, work: _Work, spec: PathSpec, request: dict, how: Execution, shard: Shard) -> dict:
    loaded = work.loaded
    attrs = {**loaded.attrs, "request": request}
    with store.create_run(out, overwrite=how.overwrite, attrs=attrs, resumable=True, resume=how.resume) as run:
        for split, dataset in loaded.data.items():
            write_data(run, split, dataset, network_logits(loaded.net, dataset.inputs, loaded.budget))
        return _write(run, work, spec, request, how, shard)


def _into(out: Path, work: _Work, spec: PathSpec, request: dict, how: Execution, shard: Shard) -> dict:
    with store.update_run(out, request=request, resume=how.resume) as (run, resumed):
        differ = [key for key in HASHES if run.attrs.get(key) != work.loaded.attrs[key]]
        sizes = {split: len(data.y) for split, data in work.loaded.data.items()}
        held = {split: run[layout.data(split)]["labels"].shape[0] for split in sizes if layout.data(split) in run}
        if differ or held != sizes:
            what = differ[0].removesuffix("_sha256") if differ else f"points {held} against {sizes}"
            raise BadInputError(f"{out} is a run of another model or data ({what} differs)")
        if layout.PATH in run and not resumed:
            if not how.overwrite:
                raise BadInputError(f"{out} already has /{layout.PATH}; pass --overwrite to replace it")
            del run[layout.PATH]
        return _write(run, work, spec, request, how, shard)


def _datasets(group: store.H5Group, work: _Work, spec: PathSpec, k: int, agreement: bool) -> dict:
    m, n, classes = len(work.f_stop), len(work.loaded.data["train"].inputs), work.f_stop.shape[1]
    split, tile = work.split, work.tile
    shapes = {
        "contributions": ((m, n, classes) if spec.all_classes else (m, n), (split, "train", "class")),
        "kernel": ((m, n), (split, "train")),
        "decay": ((m, classes), (split, "class")),
        "residual": ((m, classes), (split, "class")),
        "panels": ((m,), (split,)),
        "topk_index": ((m, k), (split, "k")),
        "topk_score": ((m, k), (split, "k")),
        "opp_index": ((m, k), (split, "k")),
        "opp_score": ((m, k), (split, "k")),
        **({"kendall_tau": ((m,), (split,)), "top10_overlap": ((m,), (split,))} if agreement else {}),
    }
    made = {}
    for name, (shape, dims) in shapes.items():
        dtype = np.int64 if name.endswith("index") or name == "panels" else np.float64
        made[name] = rows_dataset(group, name, shape, dtype, dims[: len(shape)], tile if tile < m else None, 1)
    return made


def _attribution(run: store.H5File, predicted: np.ndarray, n: int) -> store.H5Group | None:
    """/attribution, the kGLM's explanation, when the run has it for the same points and explained classes (its scores
    are read a tile at a time)."""
    group = run.get(layout.ATTRIBUTION)
    if group is None or "scores" not in group or group["scores"].shape[:2] != (len(predicted), n):
        return None
    return group if np.array_equal(group["class"][()], predicted) else None


def _kernel_scores(attribution: store.H5Group, rows: slice, classes: np.ndarray) -> np.ndarray:
    """The kGLM's attribution scores (T, N) of the rows' explained `classes` (the network's prediction, as here)."""
    scores = attribution["scores"][rows]
    return scores[np.arange(len(classes)), :, classes] if scores.ndim == 3 else scores


def _write(run: store.H5File, work: _Work, spec: PathSpec, request: dict, how: Execution, shard: Shard) -> dict:
    """/path, a row tile at a time (each checkpointed), then its attributes and the request it answers. Under torchrun
    rank r of W explains the tiles i (from the first not yet done) with (i − done) mod W = r and sends them here."""
    group = run.require_group(layout.PATH)
    _kept_sizes(group, work)
    span, m = work.span, len(work.f_stop)
    n, k = len(work.loaded.data["train"].inputs), min(spec.top_k, len(work.loaded.data["train"].inputs))
    predicted = run[layout.data(work.split)]["nn_logits"][()].argmax(1)
    attribution = _attribution(run, predicted, n)
    made = _datasets(group, work, spec, k, attribution is not None)
    for name, values in (("f_initial", work.f_start), ("f_final", work.f_stop)):
        if name not in group:
            store.write_array(group, name, values.numpy(), (work.split, "class"))
    if "class" not in group:
        store.write_array(group, "class", predicted, (work.split,))
    if "step_residual" not in group:
        store.write_array(group, "step_residual", np.zeros(span.size), ("step",))
    done = store.tiles_done(made["contributions"])
    _share(work, shard, done, predicted)
    for index, rows in resumable_tiles(made["contributions"], m, work.tile, how.progress, "path kernel"):
        owner = (index - done) % shard.world
        result = _explain(work, spec, rows, predicted) if owner == 0 else _received(work, spec, rows, owner)
        _write_tile(group, made, rows, result, work, predicted[rows], attribution)
    return _finish(group, work, spec, request)


def _explain(work: _Work, spec: PathSpec, rows: slice, predicted: np.ndarray) -> TileExplanation:
    """The path kernel of the explained points `rows` (one tile)."""
    loaded = work.loaded
    device, dtype = loaded.budget.device, work.f_stop.dtype
    tile = loaded.data[work.split].inputs[rows].to(device, dtype)
    train = loaded.data["train"]
    forward, backward = (
        steps(work.trajectory, loaded.net, train, work.span, device, dtype, work.pairs, work.tangents, forward=order)
        for order in (True, False)
    )
    classes = None if spec.all_classes else torch.from_numpy(predicted[rows]).to(device)
    tolerance = work.tolerance[rows].to(device)
    n = len(train.inputs)
    projection = None if spec.projection == "none" else Projection(spec.projection, spec.proj_dim, spec.seed)
    return explain_tile(
        tile, forward, backward, n, work.span.size, work.quadrature, tolerance, work.chunk, classes, projection
    )


def _fields(result: TileExplanation) -> list[Tensor]:
    return [getattr(result, f.name) for f in fields(result)]


def _received(work: _Work, spec: PathSpec, rows: slice, owner: int) -> TileExplanation:
    """The tile `rows` that rank `owner` explained and sent."""
    like = torch.empty((), dtype=work.f_stop.dtype, device=work.loaded.budget.device)
    n, classes = len(work.loaded.data["train"].inputs), work.f_stop.shape[1]
    result = empty_explanation(rows.stop - rows.start, n, classes, work.span.size, like, spec.all_classes)
    distributed.receive(_fields(result), owner)
    return result


def _share(work: _Work, shard: Shard, done: int, predicted: np.ndarray) -> tuple[int, np.ndarray]:
    """Rank 0's tiles done, sizes (rows per tile, Jacobians per pass, points per JVP) and explained classes, on every
    rank (the other ranks' `work` takes rank 0's sizes)."""
    if shard.world == 1:
        return done, predicted
    device = work.loaded.budget.device
    header = distributed.broadcast(
        torch.tensor([done, work.tile, work.chunk, work.pairs], dtype=torch.int64, device=device), 0, shard
    )
    classes = distributed.broadcast(torch.as_tensor(predicted, dtype=torch.int64, device=device), 0, shard)
    done, work.tile, work.chunk, work.pairs = (int(v) for v in header.cpu())
    return done, classes.cpu().numpy()


def _serve(work: _Work, spec: PathSpec, shard: Shard) -> dict:
    """Rank r > 0 under torchrun: explain the tiles it owns (`_write`) and send each to rank 0."""
    m = len(work.f_stop)
    done, predicted = _share(work, shard, 0, np.zeros(m, dtype=np.int64))
    for index, start in enumerate(range(0, m, work.tile)):
        if index >= done and (index - done) % shard.world == shard.rank:
            distributed.send(_fields(_explain(work, spec, slice(start, min(m, start + work.tile)), predicted)), 0)
    return {"rank": shard.rank}


def _kept_sizes(group: store.H5Group, work: _Work) -> None:
    """The rows per tile, Jacobians per pass and points per JVP of the run that an interrupted one started (its tiles,
    and so its numbers, stay the same whatever memory is free now); recorded on a new /path."""
    if "sizes" in group.attrs:
        work.tile, work.chunk, work.pairs = (int(v) for v in group.attrs["sizes"])
    else:
        group.attrs["sizes"] = np.array([work.tile, work.chunk, work.pairs], dtype=np.int64)


def _write_tile(
    group: store.H5Group,
    made: dict,
    rows: slice,
    result: TileExplanation,
    work: _Work,
    predicted: np.ndarray,
    attribution: store.H5Group | None,
) -> None:
    contributions = result.contributions.cpu()
    every = contributions.dim() == 3
    chosen = contributions[torch.arange(len(predicted)), :, torch.from_numpy(predicted)] if every else contributions
    change = result.change.cpu()  # Σ_i A: the stored contributions' sum where kept, by linearity elsewhere
    if every:
        change = contributions.sum(1)
    else:
        change[torch.arange(len(predicted)), torch.from_numpy(predicted)] = contributions.sum(1)
    residual = work.f_stop[rows] - work.f_start[rows] - change - result.decay.cpu()
    made["contributions"][rows] = contributions.numpy()
    made["kernel"][rows] = result.kernel.cpu().numpy()
    made["decay"][rows] = result.decay.cpu().numpy()
    made["residual"][rows] = residual.numpy()
    made["panels"][rows] = result.panels.cpu().numpy()
    for (name, _), values in zip(EXTREMES, extremes(chosen, made["topk_index"].shape[1]), strict=True):
        made[name][rows] = values.numpy()
    if attribution is not None:
        tau, overlap = agreement(chosen.numpy(), _kernel_scores(attribution, rows, predicted))
        made["kendall_tau"][rows], made["top10_overlap"][rows] = tau, overlap
    step_residual = group["step_residual"]
    step_residual[...] = np.maximum(step_residual[()], result.step_error.amax(0).cpu().numpy())


def agreement(
    path_scores: np.ndarray, kernel_scores: np.ndarray, top: int = AGREEMENT_TOP
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, Kendall's τ-b between two explanations of a point (scores of the N training points) and the share
    of their top-`top` training points in common."""
    tau = np.array([kendalltau(a, b).statistic for a, b in zip(path_scores, kernel_scores, strict=True)])
    top = min(top, path_scores.shape[1])
    first = np.argsort(-path_scores, axis=1, kind="stable")[:, :top]
    second = np.argsort(-kernel_scores, axis=1, kind="stable")[:, :top]
    overlap = np.array([len(np.intersect1d(a, b)) / top for a, b in zip(first, second, strict=True)])
    return tau, overlap


def _finish(group: store.H5Group, work: _Work, spec: PathSpec, request: dict) -> dict:
    """/path's attributes, the summary, and last the request that marks it finished."""
    residual = np.abs(group["residual"][()]).max()
    change = float((work.f_stop - work.f_start).abs().max())
    header = work.trajectory.header
    attrs = {
        "optimizer": header.optimizer,
        "loss": f"{header.loss} ({header.reduction})",
        "steps": f"{work.span.start}:{work.span.stop}",
        "nodes": spec.nodes,
        "panels": spec.panels,
        "depth": spec.depth,
        "tolerance": spec.relative_tolerance(str(work.f_stop.dtype).removeprefix("torch.")),
        "split": work.split,
        "trajectory": str(work.trajectory.path),
        "all_classes": spec.all_classes,
        "kernel": "trace" if spec.all_classes else "class",
        "projection": spec.projection,
        **({"proj_dim": spec.proj_dim, "seed": spec.seed} if spec.projection != "none" else {}),
        "max_residual": float(residual),
        "relative_residual": float(residual / change) if change else 0.0,
        "mean_panels_per_step": float(group["panels"][()].mean() / work.span.size),
    }
    if "kendall_tau" in group:
        attrs.update(
            mean_kendall_tau=float(np.nanmean(group["kendall_tau"][()])),
            mean_top10_overlap=float(np.mean(group["top10_overlap"][()])),
        )
    store.set_attrs(group, attrs)
    store.set_attrs(group, {"request": request})
    return {key: attrs[key] for key in attrs if key not in ("trajectory",)} | {"n_explained": len(work.f_stop)}
