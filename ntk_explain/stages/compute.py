"""The compute stage: every requested kernel of a model on its data into one run file, resumable, and sharded over
ranks under torchrun."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ntk_explain import resources as devices
from ntk_explain import store
from ntk_explain.errors import UsageError
from ntk_explain.options import Budget, InputSpec, KernelSpec, Resources, Shard
from ntk_explain.stages import distributed
from ntk_explain.stages.execution import Execution, Progress
from ntk_explain.stages.inputs import HASHES, Inputs, load_inputs
from ntk_explain.stages.kernels import compute_kernel, network_logits, write_data
from ntk_explain.stages.resume import finished, kept_partial, resumed_resources


def compute(
    inputs: InputSpec,
    kernels: Sequence[KernelSpec],
    out: Path,
    resources: Resources,
    how: Execution = Execution(),
) -> dict:
    """Load and check the model and data, and write the run file `out` with every kernel of `kernels` (one seed,
    projection and parameter selection for all); returns a summary.

    An interrupt keeps the partial run file; `how.resume` continues it (same options; the memory budget and batch size
    it recorded stand in for defaults, so its tiles, and therefore its numbers, stay the same). Under torchrun every
    rank writes its shard file and rank 0 joins them."""
    if not kernels:
        raise UsageError("--kernel: expected at least one kernel")
    overwrite, resume = how.overwrite, how.resume
    store.check_target(out, overwrite=overwrite or resume)  # a finished run of the same request is skipped
    shard = Shard.from_environment()
    written = out if shard.world == 1 else store.shard_path(out, shard.rank, shard.world)
    budget = devices.budget(resumed_resources(resources, written) if resume else resources, shard)
    loaded = load_inputs(inputs, budget, _kernel_options(kernels), kernels[0].seed)
    request = {
        "inputs": inputs.to_params(),
        "kernels": [spec.to_params() for spec in kernels],
        **{key: loaded.attrs[key] for key in HASHES},
    }
    if finished(out, "/", request, how):
        return {"out": str(out), "skipped": True}
    began = time.perf_counter()
    summary: dict = {"out": str(out), "device": str(budget.device), "classes": loaded.classes, "kernels": {}}
    if shard.world > 1:
        summary.update(rank=shard.rank, world_size=shard.world)
        distributed.start(shard, budget.device)
    try:
        attrs = {**loaded.attrs, "request": request}
        replacing = overwrite or shard.world > 1  # a rank's shard file is its own
        run = store.create_run(written, overwrite=replacing, attrs=attrs, resumable=True, resume=resume)
        with run as f:
            summary["resumed"] = int(f.attrs.get("resumed", 0))
            _write_kernels(f, loaded, kernels, budget, how.progress, summary)
        if shard.world > 1:
            _join(out, shard, overwrite)
    except KeyboardInterrupt:
        raise kept_partial(written) from None
    finally:
        distributed.stop(shard)
    summary["seconds"] = round(time.perf_counter() - began, 3)
    return summary


def _kernel_options(kernels: Sequence[KernelSpec]) -> dict:
    """compute's own settings, as recorded in the run's params."""
    first = kernels[0]
    return {
        "kernel": [spec.kernel for spec in kernels],
        "projection": first.projection,
        "proj_dim": first.dim,
        "feature_dtype": first.feature_dtype,
        "params": list(first.params or ["*"]),
    }


def _write_kernels(
    run: store.H5File, loaded: Inputs, kernels: Sequence[KernelSpec], budget: Budget, progress: Progress, summary: dict
) -> None:
    """/data/<split> of every data set, then every kernel, each timed in the summary."""
    data = loaded.data
    for split, dataset in data.items():
        write_data(run, split, dataset, network_logits(loaded.net, dataset.inputs, budget))
        summary[f"n_{split}"] = len(dataset.inputs)
    test = data["test"].inputs if "test" in data else None
    for spec in kernels:
        began = time.perf_counter()
        attrs = compute_kernel(run, loaded.net, spec, data["train"].inputs, test, budget, progress)
        summary["kernels"][spec.name] = {**attrs, "seconds": round(time.perf_counter() - began, 3)}


def _join(out: Path, shard: Shard, overwrite: bool) -> None:
    """Rank 0 joins the shard files into `out` once every rank has written its own."""
    distributed.barrier(shard)
    if shard.rank == 0:
        shards = [store.shard_path(out, rank, shard.world) for rank in range(shard.world)]
        store.join_shards(out, shards, overwrite=overwrite)
    distributed.barrier(shard)
