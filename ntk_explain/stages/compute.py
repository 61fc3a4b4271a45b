"""The compute stage: every requested kernel of a model on its data into one run file, resumable, and sharded over
ranks under torchrun."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ntk_explain import store
from ntk_explain.errors import UsageError
from ntk_explain.options import KERNELS, KernelSpec
from ntk_explain.stages import distributed
from ntk_explain.stages.inputs import load_inputs, split_list
from ntk_explain.stages.kernels import compute_kernel, network_logits, write_data
from ntk_explain.stages.progress import Progress


def run_compute(
    *,
    model: str,
    train: str,
    out: Path,
    test: str | None = None,
    weights: str | None = None,
    model_kwargs: str | None = None,
    kernel: str = "trace",
    projection: str = "none",
    proj_dim: int | None = None,
    feature_dtype: str | None = None,
    params: str | None = None,
    x_key: str = "x",
    y_key: str = "y",
    output_key: str | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: str | None = None,
    max_memory: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Load, validate, and write the run file with every requested kernel; returns a summary.

    An interrupt keeps the partial run file; `resume` continues it (same options; the memory budget and batch size
    it recorded stand in for defaults, so its tiles, and therefore its numbers, stay the same)."""
    store.check_target(out, overwrite=overwrite)
    shard = distributed.from_environment()
    written = out if shard.world == 1 else store.shard_path(out, shard.rank, shard.world)
    recorded = store.partial_params(written) if resume else None
    if recorded:
        max_memory = max_memory or str(recorded["max_memory"])
        batch_size = str(recorded["batch_size"]) if batch_size in (None, "auto") else batch_size
    kernels = split_list(kernel, "--kernel", KERNELS)
    globs = split_list(params, "--params")
    if proj_dim is not None and proj_dim < 1:
        raise UsageError("--proj-dim must be positive")
    options = {
        "kernel": list(kernels),
        "projection": projection,
        "proj_dim": proj_dim,
        "feature_dtype": feature_dtype,
        "params": list(globs or ["*"]),
    }
    inputs = load_inputs(
        model=model,
        train=train,
        test=test,
        weights=weights,
        model_kwargs=model_kwargs,
        x_key=x_key,
        y_key=y_key,
        output_key=output_key,
        n_train=n_train,
        n_test=n_test,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        max_memory=max_memory,
        seed=seed,
        options=options,
    )
    data, budget = inputs.data, replace(inputs.budget, shard=shard)
    specs = [KernelSpec(k, projection, proj_dim, seed, globs, feature_dtype) for k in kernels]
    started = time.perf_counter()
    summary: dict = {"out": str(out), "device": str(budget.device), "classes": inputs.classes, "kernels": {}}
    target = store.create_run(
        written, overwrite=overwrite or shard.world > 1, attrs=inputs.attrs, resumable=True, resume=resume
    )
    if shard.world > 1:
        summary.update(rank=shard.rank, world_size=shard.world)
        distributed.start(shard, budget.device)
    try:
        with target as run:
            summary["resumed"] = int(run.attrs.get("resumed", 0))
            for split, dataset in data.items():
                write_data(run, split, dataset, network_logits(inputs.net, dataset.inputs, budget))
                summary[f"n_{split}"] = len(dataset.inputs)
            for spec in specs:
                began = time.perf_counter()
                test_x = data["test"].inputs if "test" in data else None
                kernel_attrs = compute_kernel(run, inputs.net, spec, data["train"].inputs, test_x, budget, progress)
                summary["kernels"][spec.name] = {**kernel_attrs, "seconds": round(time.perf_counter() - began, 3)}
        if shard.world > 1:
            distributed.barrier(shard)
            if shard.rank == 0:
                shards = [store.shard_path(out, rank, shard.world) for rank in range(shard.world)]
                store.join_shards(out, shards, overwrite=overwrite)
            distributed.barrier(shard)
    except KeyboardInterrupt:
        raise kept_partial(written) from None
    finally:
        distributed.stop(shard)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def kept_partial(path: Path) -> KeyboardInterrupt:
    """The interrupt of a resumable command, naming the partial file it keeps (if it got as far as making one)."""
    partial = store.partial_path(path)
    return KeyboardInterrupt(f"the partial run is kept in {partial}; --resume continues it" if partial.exists() else "")
