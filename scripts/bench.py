"""Benchmark of ntk-explain's empirical-NTK computation (a benchmark, not a test).

What is measured
----------------
1. Exact trace kernel, train × train, of an MLP 784-512-512-10 (torch.manual_seed(0), float32,
   669,706 parameters, randn inputs) at N = 256:
   - ours: `stages.kernels.compute_kernel` with KernelSpec("trace") into an HDF5 run file in a temporary
     directory (the real end-to-end path, writes included), Budget(device, 2 GiB);
   - naive: the PyTorch NTK tutorial's pattern, `vmap(jacrev(f))` per-parameter Jacobians of all
     N samples, then Σ_params einsum('Naf,Maf->NM').
   Each is timed after one warm-up call at N = 8 in the same process, best of 3 repeats (naive: a
   single repeat when it takes > 10 s). Reported: the speed ratio naive/ours and the relative
   Frobenius difference of the two kernels.
2. Memory at scale: ours at N = 4096 with a 1.5 GB budget (wall time and peak RSS). The naive
   method at N = 512 needs ~15 GB (its Jacobians alone are N·10·P·4 B = 13.7 GB) and runs only
   with --full.
3. Projected pseudo-kernel features: `project(plan, tangent_factors(model, plan, x), Projection(kind,
   4096, 0), 2**27 // 4)` over N = 1024 inputs in tiles of 256, for the zoo CNN (digits-shaped
   (N, 1, 8, 8) randn inputs) and the MLP, gaussian and sparse projections: samples/s. The warm-up
   uses the same kind at d = 64 on 8 samples.

5. The distilled NTK against the full-data pipeline on the digits (1438 train, 359 test) with the zoo CNN trained
   by the demo's recipe: full = `compute --kernel pseudo --projection sparse --proj-dim 4096` + `attribute`;
   distilled = `distill --method kip|gradient|select --reduction 20` (same kernel) + `attribute --kernel distilled`.
   Each command runs as the CLI in its own process (imports included); reported: the pipeline's wall time and peak
   RSS (os.wait4), its per-sample Jacobian count (distill: N + M + kip's (steps + 1)·m), the kernel entries it
   forms (N² + MN against m² + Mm), and the surrogate's agreement with the network and Kendall τ.

6. Projection quality against TRAK's method, implemented here (per-sample gradients by vmap(grad), times a dense
   Gaussian R drawn in column chunks): pseudo features at d = 4096 of N = 256 randn inputs (CNN, MLP at init) by
   TRAK, gaussian, sparse, tensorsketch and kronecker; samples/s, the relative error of the cosine-normalised kernel
   against the exact pseudo kernel, and the share of a plain batched forward + backward pass's samples/s.

7. The scale targets: the MLP's exact trace kernel at N = 1024 (time; neural-tangents' figure is ~1.1 s) and at
   N = 8192 under a 3 GB budget (peak RSS); the CNN's exact trace kernel at N = 1024 against the naive method; the
   MLP's projected pseudo kernel (tensorsketch, d = 4096) at N = 50 000 under a 3 GB budget, end to end through
   `compute_kernel` into a run file (wall time, peak RSS, file size).

8. What the generic path costs: the exact trace kernel's tangent features (K = 10 outputs, N = 256 in tiles of 64)
   of pairs of models that compute alike (scripts/generic_models.py), one with layers the tangent plan cannot
   structure: an `nn.TransformerEncoder` with positions `pos(arange(L))` (vmap) against the same encoder written with
   `nn.Linear` projections and positions of a (1, L) buffer (batched); a GRU (the per-sample loop); weight-standardised
   convs (vmap) against plain ones (formed). Reported: samples/s, the path, the generic parameters and the time of a
   fresh plan's self-check in a warm process.

9. The two batch sizes: the exact float64 trace kernel of a 6k-parameter BatchNorm CNN on 800 train and 100 test
   random 12×12 images with `--batch-size 4` against auto (samples per forward/backward pass; the Gram tile comes
   from the memory budget in both), in one run.

10. The exact path kernel: the zoo CNN trained 2 epochs (46 steps) of SGD with momentum 0.9 in float64 on the
   digits, its trajectory recorded (`train`), its trace eNTK and kGLM (`compute`, `attribute`), then `path-kernel
   --depth 0 --nodes 2 --panels 5` (10 shared nodes a step) on the 359 test points (32 with --quick), in float64
   into the run (the rank agreement with the kGLM) and in float32 (explaind's precision) into a run of its own:
   the stage's own time (its `seconds`: the tiles, without loading, the plan's self-check and the end values; the
   process's wall time in the note), peak RSS, the identity's relative residual; beside it the `explaind` package's
   EPK (`ExactPathKernelModel.predict` timed alone, 10 midpoints per step, float32, per-training-point kernels
   kept) of the same trajectory and test points, run by scripts/peers/explaind_epk.py in its own venv
   (scripts/peers/setup_explaind.sh): its time, peak RSS and residual. Twice: on the demo's 1438 training points,
   and on the first 1408 (every batch full, the case explaind's momentum handles exactly).

How
---
Every measurement runs in a fresh subprocess (`bench.py --worker NAME ...`) that prints its
results as one JSON line, so "peak RSS" is that process's own `getrusage(RUSAGE_SELF).ru_maxrss`
(absolute, warm-up included). "base RSS" is the resident size right after imports and model
creation, to show the increment. The parent process imports neither torch nor numpy, so it stays
small (a vfork'ed child may inherit the parent's high-water mark). On CUDA the clocks are read
after `torch.cuda.synchronize()` and `torch.cuda.max_memory_allocated()` is reported too.
MB = 10**6 bytes throughout.

    python scripts/bench.py                 # full run (about 45 minutes on 2 CPU cores)
    python scripts/bench.py --quick         # N = 128 / 2048 / 256, single repeats, no workload 7 (a few minutes)
    python scripts/bench.py --full --json bench.json --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

MB = 1e6
TRACE_BUDGET = 2 * 2**30
SCALE_BUDGET = int(1.5e9)
BLOCK_BYTES = 2**27
PROJ_DIM = 4096
PROJ_TILE = 256
WARMUP_N = 8
SLOW_S = 10.0
ROUNDS, BLOCK = 5, 5  # workload 6: alternating blocks of calls of a method and of a plain forward + backward pass
ATTRIBUTE_SIZES = {"quick": (1_000, 5_000), "default": (10_000, 50_000)}  # (M explained, N train)
ATTRIBUTE_DIM = 512
ATTRIBUTE_CLASSES = 10
ATTRIBUTE_BUDGET = 2 * 10**9
DISTILL_REDUCTION = 20
GENERIC_MODELS = ("attention_torch", "attention_linear", "gru", "stdconv", "conv")  # workload 8's, generic_models.py
GENERIC_TILE = 64
PATH_RULE = (2, 5)  # workload 10: Gauss–Legendre nodes × equal panels per step, as many nodes as explaind's midpoints


# ---------------------------------------------------------------- worker side (fresh process)


def peak_rss_mb() -> float:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB


def rss_now_mb() -> float:
    """The current resident set size, from /proc when available, else the peak so far."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def resolve(spec: str) -> torch.device:
    from ntk_explain import resolve_device

    return resolve_device(spec)


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, stop_after: float | None = None) -> list[float]:
    """Wall times of up to `repeats` calls; stops early once a call exceeds `stop_after` seconds."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if stop_after is not None and times[-1] > stop_after:
            break
    return times


def make_mlp() -> nn.Sequential:
    """MLP 784-512-512-10, Linear/ReLU, float32, seeded."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()


def make_model(name: str) -> nn.Module:
    import torch

    if name == "mlp":
        return make_mlp()
    from ntk_explain import zoo

    torch.manual_seed(0)
    return zoo.make_cnn().eval()


def inputs(model: str, n: int) -> Tensor:
    """randn inputs: (n, 784) for the MLP, digits-shaped (n, 1, 8, 8) for the CNN."""
    import torch

    shape = (784,) if model == "mlp" else (1, 8, 8)
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(1))


def ours_trace(
    model: nn.Module, x: Tensor, device: torch.device, budget: int, path: Path, projection: str = "none"
) -> None:
    """The train × train kernel through `compute_kernel`, written to `path`: the exact trace kernel, or with a
    `projection` the projected pseudo kernel at d = PROJ_DIM."""
    from ntk_explain import Budget, KernelSpec, compute_kernel, create_run

    spec = KernelSpec("trace") if projection == "none" else KernelSpec("pseudo", projection, PROJ_DIM)
    with create_run(path, overwrite=True, attrs={}) as run:
        compute_kernel(run, model, spec, x, None, Budget(device, budget, None))


def naive_trace(model: nn.Module, x: Tensor) -> Tensor:
    """The PyTorch NTK tutorial: per-parameter Jacobians by vmap(jacrev), then Σ einsum('Naf,Maf->NM')."""
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def f(p: dict[str, Tensor], one: Tensor) -> Tensor:
        return functional_call(model, p, (one.unsqueeze(0),)).squeeze(0)

    jac = [j.flatten(2) for j in vmap(jacrev(f), (None, 0))(params, x).values()]
    return torch.stack([torch.einsum("Naf,Maf->NM", j, j) for j in jac]).sum(0)


def project_all(model: nn.Module, x: Tensor, kind: str, dim: int, tile: int) -> None:
    """Projected pseudo-kernel features of every tile of x (computed and dropped) by the library's featurizer (a
    sketch's layout from the first 64 rows), under a budget that gives dense projections blocks of 2²⁷ bytes."""
    from ntk_explain import SKETCH_PROBE, Budget, KernelSpec, featurizer

    features = featurizer(model, KernelSpec("pseudo", kind, dim), x[:SKETCH_PROBE], Budget(x.device, 8 * BLOCK_BYTES))
    for start in range(0, len(x), tile):
        features.featurize(x[start : start + tile])


def trak_features(model: nn.Module, x: Tensor, dim: int, tile: int, seed: int = 0) -> Tensor:
    """TRAK's method, as a baseline: per-sample gradients of the pseudo output Σ_c f_c/√C (vmap(grad)), flattened,
    times a dense Gaussian R (P × d, N(0, 1/d)) drawn in column chunks of the gradient (seeded, reused per tile)."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def pseudo(p: dict[str, Tensor], one: Tensor) -> Tensor:
        logits = functional_call(model, p, (one.unsqueeze(0),)).squeeze(0)
        return logits.sum() / logits.shape[0] ** 0.5

    chunk = max(1, 2**24 // dim)
    out = []
    for start in range(0, len(x), tile):
        grads = torch.cat(
            [g.flatten(1) for g in vmap(grad(pseudo), (None, 0))(params, x[start : start + tile]).values()], 1
        )
        features = grads.new_zeros((grads.shape[0], dim))
        generator = torch.Generator(device=grads.device).manual_seed(seed)
        for c0 in range(0, grads.shape[1], chunk):
            block = torch.randn(min(chunk, grads.shape[1] - c0), dim, generator=generator, device=grads.device)
            features += grads[:, c0 : c0 + chunk] @ block
        out.append(features / dim**0.5)
    return torch.cat(out)


def quality_worker(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Projected pseudo features of N inputs by one method: samples/s, the relative error of their cosine kernel
    against the exact pseudo kernel, and the samples/s of a plain batched forward + backward pass of the model."""
    import numpy as np
    import torch

    from ntk_explain import (
        SKETCH_PROBE,
        Budget,
        KernelSpec,
        cosine_normalize,
        featurizer,
        gram,
        plan_tangents,
        tangent_factors,
    )

    model = make_model(args.model).to(device)
    x = inputs(args.model, args.n).to(device)
    plan = plan_tangents(model, x, "pseudo")
    base = rss_now_mb()

    def method(seed: int) -> Callable[[Tensor], Tensor]:
        """Features of a batch by TRAK's method or the library's featurizer (a sketch's layout from the first 64
        rows, set here, before the timing), for one seed."""
        if args.kind == "trak":
            return lambda xs: trak_features(model, xs, args.dim, args.tile, seed)
        spec = KernelSpec("pseudo", args.kind, args.dim, seed)
        ours = featurizer(model, spec, x[:SKETCH_PROBE], Budget(device, 2**31))
        return lambda xs: torch.cat(
            [ours.featurize(xs[s : s + args.tile]).dense[:, 0] for s in range(0, len(xs), args.tile)]
        )

    def forward_backward() -> None:
        for s in range(0, args.n, args.tile):
            model.zero_grad()
            model(x[s : s + args.tile]).sum().backward()

    factors = tangent_factors(model, plan, x)
    exact = gram(factors, factors, "trace").double().cpu().numpy()
    cosine_exact = cosine_normalize(exact, exact.diagonal(), exact.diagonal())

    def cosine_error(phi: Tensor) -> float:
        approx = phi.double().cpu().numpy() @ phi.double().cpu().numpy().T
        cosine_approx = cosine_normalize(approx, approx.diagonal(), approx.diagonal())
        return float(np.linalg.norm(cosine_approx - cosine_exact) / np.linalg.norm(cosine_exact))

    # blocks of 5 calls of the method and of a plain pass alternate, best of 25 each: one call takes milliseconds, and
    # this shared machine's speed drifts by up to 2× within seconds, so passes measured far apart are not comparable;
    # a call right after the other kind is slower (its allocations), so calls come in blocks
    with torch.no_grad():
        features = method(0)
        if args.kind != "trak":  # warm-up (TRAK's cost is its R, drawn for every batch anyway)
            features(x[:WARMUP_N])
        result: list[Tensor] = []
        times, plain = [], []
        for _ in range(ROUNDS):
            with torch.enable_grad():
                plain += timed(forward_backward, device, BLOCK)
            if sum(times) < SLOW_S:  # a slow method (TRAK's): one call per block, until SLOW_S is spent
                times += timed(lambda: result.append(features(x)), device, BLOCK, stop_after=1.0)
        errors = [cosine_error(result[-1])] + [cosine_error(method(seed)(x)) for seed in range(1, args.seeds)]

    return {
        "worker": "quality",
        "device": str(device),
        "n": args.n,
        "n_params": sum(p.numel() for p in model.parameters()),
        "times_s": times,
        "best_s": min(times),
        "samples_per_s": args.n / min(times),
        "cosine_error": float(np.mean(errors)),
        "cosine_errors": errors,
        "fwd_bwd_samples_per_s": args.n / min(plain),
        "base_rss_mb": base,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_mb": torch_cuda_peak(device),
    }


def generic_worker(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The exact trace kernel's tangent features (K = 10 outputs) of one of workload 8's models, in tiles of 64:
    samples/s, the path the tangent plan took, its generic parameters, and the self-check's time for a fresh plan in
    a warm process (probe rows the warm-up did not use)."""
    from generic_models import generic_inputs, make_generic_model

    from ntk_explain import Budget, KernelSpec, featurizer

    model = make_generic_model(args.model).to(device)
    x = generic_inputs(args.model, args.n + 2).to(device)
    base = rss_now_mb()
    budget = Budget(device, args.budget)
    features = featurizer(model, KernelSpec("trace"), x[:WARMUP_N], budget)
    features.featurize(x[:WARMUP_N])

    def featurize_all() -> None:
        for start in range(0, args.n, GENERIC_TILE):
            features.featurize(x[start : min(args.n, start + GENERIC_TILE)])

    times = timed(featurize_all, device, args.repeats)
    fresh = featurizer(model, KernelSpec("trace"), x[args.n :], budget).attrs
    generic = [name for names in json.loads(fresh["generic"]).values() for name in names]
    sizes = dict(model.named_parameters())
    return {
        "worker": "generic",
        "device": str(device),
        "n": args.n,
        "n_params": sum(p.numel() for p in sizes.values()),
        "generic_params": sum(sizes[name].numel() for name in generic),
        "path": fresh["tangent_path"],
        "check_s": fresh["check_seconds"],
        "times_s": times,
        "best_s": min(times),
        "samples_per_s": args.n / min(times),
        "base_rss_mb": base,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_mb": torch_cuda_peak(device),
    }


def batches_worker(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Workload 9: the exact float64 trace kernel of the 6k-parameter BatchNorm CNN on N train and N/8 test random
    12×12 images, train × train and test × train, through `compute_kernel` into a run file, with `--batch-size`
    (samples per forward/backward pass; 0: auto) under the default 2 GiB budget."""
    import torch
    from generic_models import batchnorm_cnn

    from ntk_explain import Budget, KernelSpec, compute_kernel, create_run

    model = batchnorm_cnn().to(device)
    generator = torch.Generator().manual_seed(1)
    train, test = (torch.randn(n, 1, 12, 12, generator=generator, dtype=torch.float64) for n in (args.n, args.n // 8))
    budget = Budget(device, args.budget, args.batch or None)
    base, tmp = rss_now_mb(), Path(args.tmp)

    def run(path: Path, x: Tensor, y: Tensor) -> dict:
        with create_run(path, overwrite=True, attrs={}) as f:
            return compute_kernel(f, model, KernelSpec("trace"), x.to(device), y.to(device), budget)

    run(tmp / "warmup.h5", train[:16], test[:4])
    paths = iter(tmp / f"batches-{i}.h5" for i in range(args.repeats))
    attrs: list[dict] = []
    times = timed(lambda: attrs.append(run(next(paths), train, test)), device, args.repeats)
    return {
        "worker": "batches",
        "device": str(device),
        "n": args.n,
        "batch": args.batch or "auto",
        "tile": int(attrs[-1]["tile"]),
        "times_s": times,
        "best_s": min(times),
        "base_rss_mb": base,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_mb": torch_cuda_peak(device),
    }


def torch_cuda_peak(device: torch.device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this (fresh) process, whose allocator keeps freed memory as the CLI's does (every method and
    baseline alike); returns what the parent prints."""
    import numpy as np
    import torch

    from ntk_explain import retain_freed_memory

    retain_freed_memory()
    device = resolve(args.device)
    if args.worker in ("synthetic", "attribute"):
        return attribute_worker(args, device)
    if args.worker == "quality":
        return quality_worker(args, device)
    if args.worker == "generic":
        return generic_worker(args, device)
    if args.worker == "batches":
        return batches_worker(args, device)
    if args.worker == "weights":
        from safetensors.torch import save_file

        from ntk_explain import zoo

        x, y, _ = zoo.digits("train")
        torch.manual_seed(0)
        model = zoo.train_classifier(zoo.make_cnn(), torch.from_numpy(x), torch.from_numpy(y))
        save_file(model.state_dict(), str(Path(args.tmp) / "cnn.safetensors"))
        return {
            "worker": "weights",
            "device": "cpu",
            "n": len(x),
            "times_s": [0.0],
            "best_s": 0.0,
            "base_rss_mb": 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "cuda_peak_mb": None,
        }
    model = make_model(args.model).to(device)
    x = inputs(args.model, args.n)
    base = rss_now_mb()
    extra: dict[str, Any] = {}
    tmp = Path(args.tmp)
    if args.worker == "ours":
        ours_trace(model, x[:WARMUP_N], device, args.budget, tmp / "warmup.h5", args.projection)
        paths = iter(tmp / f"ours-{args.n}-{i}.h5" for i in range(args.repeats))
        times = timed(
            lambda: ours_trace(model, x, device, args.budget, next(paths), args.projection), device, args.repeats
        )
        extra["file_mb"] = max(p.stat().st_size for p in tmp.glob(f"ours-{args.n}-*.h5")) / MB
        if args.save:
            import h5py

            with h5py.File(tmp / f"ours-{args.n}-0.h5", "r") as run:
                np.save(args.save, run["kernel/trace/train_train"][...])
    elif args.worker == "naive":
        xd = x.to(device)
        naive_trace(model, xd[:WARMUP_N])
        result: list[Tensor] = []
        times = timed(lambda: result.append(naive_trace(model, xd)), device, args.repeats, SLOW_S)
        if args.reference:
            ours = torch.from_numpy(np.load(args.reference)).double()
            naive = result[-1].double().cpu()
            extra["rel_frobenius"] = float(torch.linalg.norm(ours - naive) / torch.linalg.norm(naive))
    elif args.worker == "project":
        xd = x.to(device)
        project_all(model, xd[:WARMUP_N], args.kind, 64, args.tile)
        times = timed(lambda: project_all(model, xd, args.kind, args.dim, args.tile), device, args.repeats)
        extra["samples_per_s"] = args.n / min(times)
    else:
        raise SystemExit(f"unknown worker {args.worker!r}")
    return {
        "worker": args.worker,
        "device": str(device),
        "n": args.n,
        "n_params": sum(p.numel() for p in model.parameters()),
        "times_s": times,
        "best_s": min(times),
        "base_rss_mb": base,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_mb": torch_cuda_peak(device),
        **extra,
    }


def synthetic_run(path: Path, m: int, n: int, dim: int, classes: int) -> None:
    """A run file holding a projected pseudo kernel of synthetic features: noisy class clusters in R^dim, and a
    linear 'network' whose logits are the features' inner products with the cluster centres. It stores the
    features, the self-kernels and test_train (M, N); attribute fits from the features and needs no train_train."""
    import numpy as np

    from ntk_explain import store
    from ntk_explain.store import layout

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim))
    attrs = store.provenance(["bench.py"], {"synthetic": True}, "cpu", 0, "synthetic", None, "synthetic")
    with store.create_run(path, overwrite=True, attrs=attrs) as run:
        kernel = run.create_group(layout.kernel(f"pseudo-gaussian-{dim}"))
        features = {}
        for split, count in (("train", n), ("test", m)):
            labels = rng.integers(0, classes, count)
            phi = (centres[labels] + 3.0 * rng.normal(size=(count, dim))).astype(np.float32)
            features[split] = phi
            group = run.create_group(layout.data(split))
            store.write_array(group, "labels", labels, (split,))
            store.write_array(group, "index", np.arange(count), (split,))
            store.write_array(group, "nn_logits", (phi @ centres.T / np.sqrt(dim)).astype(np.float32), (split, "class"))
            store.write_array(kernel, layout.diag(split), (phi.astype(np.float64) ** 2).sum(1), (split,))
        store.write_array(kernel, layout.features("train"), features["train"][:, None, :], ("train", "output", "proj"))
        test_train = store.create_rows(kernel, layout.block("test"), (m, n), np.float32, ("test", "train"))
        for start in range(0, m, 1000):
            test_train[start : start + 1000] = features["test"][start : start + 1000] @ features["train"].T
        store.set_attrs(kernel, {"kernel": "pseudo", "projection": "gaussian", "proj_dim": dim, "complete": True})


def attribute_worker(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """`synthetic`: write the synthetic run file; `attribute`: fit, attribute and score it under the budget."""

    path = Path(args.tmp) / "synthetic.h5"
    base = rss_now_mb()
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if args.worker == "synthetic":
        synthetic_run(path, args.m, args.n, ATTRIBUTE_DIM, ATTRIBUTE_CLASSES)
    else:
        from ntk_explain import AttributeSpec, Resources, attribute

        summary = attribute(path, AttributeSpec(), Resources(str(device), str(args.budget)))
        extra = {key: summary["faithfulness"][key] for key in ("agreement", "kendall_tau")}
    elapsed = time.perf_counter() - start
    return {
        "worker": args.worker,
        "device": str(device),
        "n": args.n,
        "m": args.m,
        "times_s": [elapsed],
        "best_s": elapsed,
        "base_rss_mb": base,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_mb": torch_cuda_peak(device),
        "file_mb": path.stat().st_size / MB,
        **extra,
    }


# ---------------------------------------------------------------- parent side (no torch)


@dataclass
class Row:
    """One line of the summary table."""

    workload: str
    n: int
    ours_s: float | None = None
    naive_s: float | None = None
    peak_ours_mb: float | None = None
    peak_naive_mb: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.naive_s / self.ours_s if self.ours_s and self.naive_s else None


def spawn(name: str, device: str, tmp: str, **options: object) -> dict[str, Any]:
    """Run `bench.py --worker name` in a fresh process; its JSON result, or {'error': ...}."""
    command = [sys.executable, __file__, "--worker", name, "--device", device, "--tmp", tmp]
    for key, value in options.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"error": f"rc={done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def describe(label: str, result: dict[str, Any]) -> str:
    """One progress line for a finished worker."""
    if "error" in result:
        return f"{label:<34} FAILED {result['error']}"
    times = ", ".join(f"{t:.3f}" for t in result["times_s"])
    gpu = f", GPU peak {result['cuda_peak_mb']:.0f} MB" if result["cuda_peak_mb"] is not None else ""
    return (
        f"{label:<34} N={result['n']:<5} best {result['best_s']:8.3f} s  (runs: {times})  "
        f"base RSS {result['base_rss_mb']:.0f} MB, peak RSS {result['peak_rss_mb']:.0f} MB{gpu}"
    )


def measure(label: str, name: str, args: argparse.Namespace, tmp: str, **options: object) -> dict[str, Any]:
    result = spawn(name, args.device, tmp, **options)
    print(describe(label, result), flush=True)
    return result


def gpu_note(*results: dict[str, Any]) -> str:
    peaks = [f"{r['cuda_peak_mb']:.0f}" for r in results if r.get("cuda_peak_mb") is not None]
    return f"; GPU peak {'/'.join(peaks)} MB" if peaks else ""


def workload_exact(args: argparse.Namespace, tmp: str, n: int, repeats: int) -> tuple[Row, dict]:
    """1: ours vs the naive vmap(jacrev) + einsum trace kernel at the same N."""
    save = str(Path(tmp) / "ours.npy")
    ours = measure("1 ours trace (MLP)", "ours", args, tmp, n=n, repeats=repeats, budget=TRACE_BUDGET, save=save)
    reference = save if "error" not in ours else None
    naive = measure("1 naive trace (MLP)", "naive", args, tmp, n=n, repeats=repeats, reference=reference)
    row = Row("1 exact trace, MLP 670k", n, ours.get("best_s"), naive.get("best_s"))
    row.peak_ours_mb, row.peak_naive_mb = ours.get("peak_rss_mb"), naive.get("peak_rss_mb")
    notes = [f"base RSS {ours.get('base_rss_mb', 0):.0f}/{naive.get('base_rss_mb', 0):.0f} MB"]
    if "rel_frobenius" in naive:
        notes.insert(0, f"rel. Frobenius diff {naive['rel_frobenius']:.1e}")
    notes += [r["error"] for r in (ours, naive) if "error" in r]
    row.note = "; ".join(notes) + gpu_note(ours, naive)
    return row, {"ours": ours, "naive": naive}


def workload_scale(args: argparse.Namespace, tmp: str, n: int) -> tuple[list[Row], dict]:
    """2: ours at large N under a 1.5 GB budget; the naive method at N = 512 only with --full."""
    ours = measure("2 ours trace, 1.5 GB budget (MLP)", "ours", args, tmp, n=n, repeats=1, budget=SCALE_BUDGET)
    row = Row("2 exact trace at scale, 1.5 GB budget", n, ours.get("best_s"), peak_ours_mb=ours.get("peak_rss_mb"))
    row.note = ours.get("error", f"base RSS {ours.get('base_rss_mb', 0):.0f} MB; target peak < 2000 MB")
    row.note += gpu_note(ours)
    rows, raw = [row], {"ours": ours}
    if args.full:
        naive = measure("2 naive trace (MLP)", "naive", args, tmp, n=512, repeats=1)
        extra = Row(
            "2 naive memory (--full)",
            512,
            naive_s=naive.get("best_s"),
            peak_naive_mb=naive.get("peak_rss_mb"),
        )
        extra.note = naive.get("error", f"base RSS {naive.get('base_rss_mb', 0):.0f} MB") + gpu_note(naive)
        rows.append(extra)
        raw["naive_512"] = naive
    else:
        row.note += "; naive at N=512 not run (needs ~15 GB; use --full)"
    return rows, raw


def workload_project(args: argparse.Namespace, tmp: str, n: int) -> tuple[list[Row], dict]:
    """3: projected pseudo-kernel features/s at d = 4096, CNN and MLP, gaussian and sparse."""
    rows, raw = [], {}
    for model in ("cnn", "mlp"):
        for kind in ("gaussian", "sparse", "tensorsketch", "kronecker"):
            label = f"3 pseudo {kind} d={PROJ_DIM} ({model.upper()})"
            result = measure(
                label,
                "project",
                args,
                tmp,
                n=n,
                repeats=1,
                model=model,
                kind=kind,
                dim=PROJ_DIM,
                tile=PROJ_TILE,
            )
            row = Row(f"3 pseudo features {model.upper()}, {kind} d={PROJ_DIM}", n, result.get("best_s"))
            row.peak_ours_mb = result.get("peak_rss_mb")
            if "error" in result:
                row.note = result["error"]
            else:
                row.note = (
                    f"{result['samples_per_s']:.0f} samples/s; P={result['n_params']}; "
                    f"base RSS {result['base_rss_mb']:.0f} MB" + gpu_note(result)
                )
            rows.append(row)
            raw[f"{model}-{kind}"] = result
    return rows, raw


def workload_attribute(args: argparse.Namespace, tmp: str, m: int, n: int) -> tuple[list[Row], dict]:
    """4: attribute (kGLM fit + streamed scores + metrics) on a synthetic M × N projected kernel, 2 GB budget."""
    made = measure("4 synthetic run file", "synthetic", args, tmp, n=n, m=m)
    done = measure("4 attribute", "attribute", args, tmp, n=n, m=m, budget=ATTRIBUTE_BUDGET)
    row = Row(
        f"4 attribute, synthetic M={m} × N={n} (d={ATTRIBUTE_DIM})",
        n,
        done.get("best_s"),
        peak_ours_mb=done.get("peak_rss_mb"),
    )
    row.note = done.get("error") or (
        f"budget 2 GB; base RSS {done['base_rss_mb']:.0f} MB; run file {done['file_mb']:.0f} MB "
        f"(written in {made.get('times_s', [0])[0]:.0f} s); agreement {done['agreement']:.3f}"
    )
    return [row], {"synthetic": made, "attribute": done}


def cli_pipeline(commands: list[list[str]]) -> dict[str, Any]:
    """Run `ntk-explain` commands one after the other, each in its own process: total wall time, the largest peak
    RSS (os.wait4's rusage of each), and the JSON each printed last; {'error': ...} on a failure."""
    wall, peak, outputs = 0.0, 0.0, []
    for command in commands:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            began = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-m", "ntk_explain", *command], stdout=out, stderr=err)
            _, status, usage = os.wait4(process.pid, 0)
            wall += time.perf_counter() - began
            out.seek(0), err.seek(0)
            if os.waitstatus_to_exitcode(status):
                return {"error": f"{command[0]}: {' '.join(err.read().strip().splitlines()[-1:])}"}
            peak = max(peak, usage.ru_maxrss * 1024 / MB)
            outputs.append(json.loads(out.read().strip().splitlines()[-1]))
    return {"wall_s": wall, "peak_rss_mb": peak, "outputs": outputs}


def workload_distill(args: argparse.Namespace, tmp: str, reduction: float) -> tuple[list[Row], dict]:
    """5: distill + attribute on the support against compute + attribute on all the data, same projected kernel."""
    measure("5 train the zoo CNN (digits)", "weights", args, tmp)
    data = ["--model", "zoo:cnn", "--weights", str(Path(tmp) / "cnn.safetensors"), "--train", "zoo:digits"]
    data += ["--test", "zoo:digits", "--device", args.device, "--quiet", "--json"]
    kernel = ["--kernel", "pseudo", "--projection", "sparse", "--proj-dim", str(PROJ_DIM)]
    full_run = str(Path(tmp) / "full.h5")
    runs = {
        "full data": cli_pipeline(
            [
                ["compute", *data, *kernel, "--out", full_run],
                ["attribute", full_run, "--kernel", f"pseudo-sparse-{PROJ_DIM}", "--quiet", "--json"],
            ]
        )
    }
    for method in ("kip", "gradient", "select"):
        path = str(Path(tmp) / f"{method}.h5")
        runs[method] = cli_pipeline(
            [
                ["distill", *data, *kernel, "--method", method, "--reduction", str(reduction), "--out", path],
                ["attribute", path, "--kernel", "distilled", "--quiet", "--json"],
            ]
        )
    for result in runs.values():
        result["device"] = args.device
    full = runs["full data"]
    rows = []
    for label, result in runs.items():
        row = Row(f"5 {label} pipeline (pseudo, sparse d={PROJ_DIM})", 0)
        if "error" in result:
            row.note = result["error"]
            rows.append(row)
            continue
        made, explained = result["outputs"]
        metrics = explained["faithfulness"]
        if label == "full data":
            n, m = made["n_train"], made["n_train"]
            jacobians, tested = made["n_train"] + made["n_test"], made["n_test"]
        else:
            n, m, jacobians, tested = made["n_train"], made["m"], made["jacobians"], metrics["n"]
            row.naive_s = full.get("wall_s")
        row.n, row.ours_s, row.peak_ours_mb = n, result["wall_s"], result["peak_rss_mb"]
        row.note = (
            f"support m={m}; {jacobians} Jacobians; {m * m + tested * m} kernel entries; "
            f"agreement {metrics['agreement']:.3f}, τ {metrics['kendall_tau']:.3f}"
        )
        rows.append(row)
        print(f"{row.workload:<44} {row.ours_s:7.1f} s  {row.note}", flush=True)
    return rows, runs


def explaind_python() -> Path:
    """explaind's venv (scripts/peers/setup_explaind.sh), outside the repo."""
    return Path(os.environ.get("NTK_PEERS_CACHE", Path.home() / ".cache/ntk-peers")) / "venv-explaind/bin/python"


def explaind_epk(trajectory: str, n_train: int | None, n_test: int | None) -> dict[str, Any]:
    """explaind's EPK of the trajectory (scripts/peers/explaind_epk.py, in its own venv): its JSON line and the
    process's peak RSS, or {'error': ...}."""
    python = explaind_python()
    if not python.exists():
        return {"error": f"not installed ({python}; bash scripts/peers/setup_explaind.sh)"}
    command = [str(python), str(Path(__file__).parent / "peers/explaind_epk.py"), "--trajectory", trajectory]
    command += [*(["--n-train", str(n_train)] if n_train else []), *(["--n-test", str(n_test)] if n_test else [])]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status):
            return {"error": " ".join(err.read().strip().splitlines()[-1:])}
        return {**json.loads(out.read().strip().splitlines()[-1]), "peak_rss_mb": usage.ru_maxrss * 1024 / MB}


def workload_path(args: argparse.Namespace, tmp: str, n_test: int | None) -> tuple[list[Row], dict]:
    """10: the exact path kernel of the demo CNN trained 2 epochs with SGD + momentum in float64 (trajectory
    recorded), on the test digits, beside its kGLM explanation and beside the `explaind` package's EPK of the same
    trajectory and points (its own venv). Twice: the demo's 1438 training points (a last batch of 30 each epoch) and
    the first 1408 (every batch 64), since explaind's momentum scales past batches by the current batch's size."""
    rows, raws = [], {}
    for label, n_train in (("1438 train", None), ("1408 train, full batches", 1408)):
        cnn = ["--model", "zoo:cnn", "--train", "zoo:digits", "--dtype", "float64", "--device", args.device]
        cnn += ["--n-train", str(n_train)] if n_train else []
        names = ("sgd.safetensors", "sgd.traj.h5", "path.h5")
        weights, trajectory, run = (str(Path(tmp) / f"{n_train or 'all'}-{name}") for name in names)
        explained = [*cnn, "--weights", weights, "--test", "zoo:digits", *(["--n-test", str(n_test)] if n_test else [])]
        recipe = ["--lr", "0.05", "--momentum", "0.9", "--out", weights, "--trajectory", trajectory, "--json"]
        result = cli_pipeline(
            [
                ["train", *cnn, *recipe],
                ["compute", *explained, "--kernel", "trace", "--out", run, "--quiet", "--json"],
                ["attribute", run, "--quiet", "--json"],
            ]
        )
        quadrature = ["--depth", "0", "--nodes", str(PATH_RULE[0]), "--panels", str(PATH_RULE[1])]
        path = ["path-kernel", *explained, *quadrature, "--trajectory", trajectory, "--json"]
        runs = {  # float64 beside the kGLM (their agreement); float32 (the last --dtype counts) at explaind's precision
            "float64": cli_pipeline([[*path, "--run", run]]),
            "float32": cli_pipeline([[*path, "--dtype", "float32", "--out", str(Path(tmp) / f"{n_train}-f32.h5")]]),
        }
        peer = explaind_epk(trajectory, n_train, n_test) if "error" not in result else {"error": "not run"}
        theirs = peer.get("error") or (
            f"explaind {peer['wall_s']:.1f} s, relative residual {peer['relative_residual']:.1e} "
            f"({peer['midpoints']} midpoints, float32)"
        )
        for precision, exact in runs.items():
            row = Row(f"10 path kernel vs explaind ({label}, {precision})", 0)
            if "error" in result or "error" in exact:
                row.note = result.get("error") or exact["error"]
            else:
                summary = exact["outputs"][0]
                row.n, row.ours_s, row.peak_ours_mb = summary["n_explained"], summary["seconds"], exact["peak_rss_mb"]
                row.naive_s, row.peak_naive_mb = peer.get("wall_s"), peer.get("peak_rss_mb")
                agreement = (
                    f"; against the kGLM: τ {summary['mean_kendall_tau']:.3f}, top-10 overlap "
                    f"{summary['mean_top10_overlap']:.3f}"
                    if "mean_kendall_tau" in summary
                    else ""
                )
                row.note = (
                    f"{summary['steps']} steps, relative residual {summary['relative_residual']:.1e}, process "
                    f"{exact['wall_s']:.1f} s{agreement}; {theirs}"
                )
                print(f"{row.workload:<44} {row.ours_s:7.1f} s  {row.note}", flush=True)
            exact["device"] = args.device
            rows.append(row)
            raws[f"{label}: path-kernel {precision}"] = exact
        raws[f"{label}: explaind"] = peer
    return rows, raws


def workload_quality(args: argparse.Namespace, tmp: str, n: int) -> tuple[list[Row], dict]:
    """6: pseudo features at d = 4096 against TRAK's dense Gaussian projection (implemented here): samples/s, cosine
    kernel error against the exact pseudo kernel (the mean over seeds 0, 1, 2; seed 0 alone with --quick), and the
    share of a plain forward + backward pass's samples/s."""
    rows, raw = [], {}
    seeds = 1 if args.quick else 3
    for model in ("cnn", "mlp"):
        results = {}
        for kind in ("trak", "gaussian", "sparse", "tensorsketch", "kronecker"):
            label = f"6 pseudo {kind} d={PROJ_DIM} ({model.upper()})"
            options = {"model": model, "kind": kind, "dim": PROJ_DIM, "tile": PROJ_TILE, "seeds": seeds}
            results[kind] = measure(label, "quality", args, tmp, n=n, repeats=1, **options)
        trak = results["trak"]
        for kind, result in results.items():
            row = Row(f"6 {kind} vs TRAK, {model.upper()} d={PROJ_DIM}", n, result.get("best_s"), trak.get("best_s"))
            row.peak_ours_mb, row.peak_naive_mb = result.get("peak_rss_mb"), trak.get("peak_rss_mb")
            row.note = result.get("error") or (
                f"{result['samples_per_s']:.0f} samples/s, cosine error {result['cosine_error']:.4f} (mean of {seeds}) "
                f"(TRAK {trak.get('cosine_error', float('nan')):.4f}); "
                f"{100 * result['samples_per_s'] / result['fwd_bwd_samples_per_s']:.0f}% of forward+backward "
                f"({result['fwd_bwd_samples_per_s']:.0f} samples/s)"
            )
            rows.append(row)
            raw[f"{model}-{kind}"] = result
    return rows, raw


def workload_targets(args: argparse.Namespace, tmp: str) -> tuple[list[Row], dict]:
    """7: the scale targets of issue 5: the MLP's exact trace kernel at N = 1024 (neural-tangents' structured
    derivatives take ~1.1 s on these machines; the naive method cannot hold N = 1024 in 24 GB) and at N = 8192 under
    a 3 GB budget (target peak < 4 GB); the CNN's exact trace kernel at N = 1024 against the naive method (target
    ≥ 5×); the MLP's projected pseudo kernel (tensorsketch, d = 4096) at N = 50 000 end to end under a 3 GB budget,
    its 50 000² kernel written to the run file (target peak < 4 GB)."""
    budget, rows, raw = 3 * 10**9, [], {}
    mlp = measure("7 ours trace N=1024 (MLP)", "ours", args, tmp, n=1024, repeats=3, budget=budget)
    rows.append(Row("7 exact trace, MLP 670k (neural-tangents ~1.1 s)", 1024, mlp.get("best_s")))
    rows[-1].peak_ours_mb = mlp.get("peak_rss_mb")
    big = measure("7 ours trace N=8192 (MLP)", "ours", args, tmp, n=8192, repeats=1, budget=budget)
    rows.append(
        Row("7 exact trace, MLP 670k, 3 GB budget", 8192, big.get("best_s"), peak_ours_mb=big.get("peak_rss_mb"))
    )
    save = str(Path(tmp) / "cnn.npy")
    cnn = measure(
        "7 ours trace N=1024 (CNN)", "ours", args, tmp, n=1024, repeats=3, budget=budget, model="cnn", save=save
    )
    naive = measure("7 naive trace N=1024 (CNN)", "naive", args, tmp, n=1024, repeats=1, model="cnn", reference=save)
    rows.append(Row("7 exact trace, zoo CNN 38k", 1024, cnn.get("best_s"), naive.get("best_s")))
    rows[-1].peak_ours_mb, rows[-1].peak_naive_mb = cnn.get("peak_rss_mb"), naive.get("peak_rss_mb")
    rows[-1].note = f"rel. Frobenius diff {naive.get('rel_frobenius', float('nan')):.1e}"
    scale = measure(
        "7 ours pseudo tensorsketch N=50000 (MLP)",
        "ours",
        args,
        tmp,
        n=50_000,
        budget=budget,
        projection="tensorsketch",
    )
    rows.append(Row(f"7 projected pseudo, tensorsketch d={PROJ_DIM}, MLP, 3 GB budget", 50_000, scale.get("best_s")))
    rows[-1].peak_ours_mb = scale.get("peak_rss_mb")
    rows[-1].note = scale.get("error") or f"run file {scale['file_mb']:.0f} MB"
    for row, result in zip(rows, (mlp, big, cnn, scale), strict=True):
        row.note = "; ".join(filter(None, [row.note, result.get("error"), gpu_note(result).lstrip("; ")]))
    raw.update(mlp_1024=mlp, mlp_8192=big, cnn_1024=cnn, cnn_naive_1024=naive, mlp_50000=scale)
    return rows, raw


def workload_generic(args: argparse.Namespace, tmp: str, n: int, repeats: int) -> tuple[list[Row], dict]:
    """8: what the generic path costs: the exact trace kernel's tangent features of pairs of models that compute alike,
    one with layers the plan cannot structure (nn.MultiheadAttention and positions without a batch axis: vmap; a GRU:
    the per-sample loop; weight-standardised convs: vmap), one without (scripts/generic_models.py)."""
    rows, raw = [], {}
    for name in GENERIC_MODELS:
        result = measure(f"8 exact trace ({name})", "generic", args, tmp, n=n, repeats=repeats, model=name)
        row = Row(f"8 exact trace features, {name}", n, result.get("best_s"), peak_ours_mb=result.get("peak_rss_mb"))
        row.note = result.get("error") or (
            f"{result['samples_per_s']:.0f} samples/s; path {result['path']}; generic "
            f"{result['generic_params']} of {result['n_params']} params; self-check {1000 * result['check_s']:.0f} ms"
        )
        rows.append(row)
        raw[name] = result
    return rows, raw


def workload_batches(args: argparse.Namespace, tmp: str, n: int, repeats: int) -> tuple[list[Row], dict]:
    """9: `--batch-size 4` against auto on the float64 exact trace kernel of a 6k-parameter BatchNorm CNN: the batch
    is the samples of one forward/backward pass, the Gram tile comes from the memory budget either way."""
    results = {
        batch: measure(
            f"9 exact trace, --batch-size {batch or 'auto'}", "batches", args, tmp, n=n, repeats=repeats, batch=batch
        )
        for batch in (0, 4)
    }
    auto, four = results[0], results[4]
    row = Row(
        "9 exact trace float64, BatchNorm CNN 6k, --batch-size 4 vs auto", n, four.get("best_s"), auto.get("best_s")
    )
    row.peak_ours_mb, row.peak_naive_mb = four.get("peak_rss_mb"), auto.get("peak_rss_mb")
    row.note = (
        four.get("error")
        or auto.get("error")
        or (
            f"baseline = auto: --batch-size 4 takes {four['best_s'] / auto['best_s']:.2f}× its time (target ≤ 1.5×); "
            f"tiles of {four['tile']} and {auto['tile']} rows"
        )
    )
    return [row], {"auto": auto, "batch4": four}


def fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[Row]) -> str:
    """The compact summary table."""
    lines = [
        "| workload | N | ours s | baseline s | ratio | peak MB ours | peak MB baseline | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cells = [
            r.workload,
            str(r.n),
            fmt(r.ours_s, 3),
            fmt(r.naive_s, 2),
            fmt(r.ratio, 0 if r.ratio and r.ratio >= 10 else 1) + ("×" if r.ratio else ""),
            fmt(r.peak_ours_mb, 0),
            fmt(r.peak_naive_mb, 0),
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_all(args: argparse.Namespace) -> None:
    n1, n2, n3 = (128, 2048, 256) if args.quick else (256, 4096, 1024)
    repeats = 1 if args.quick else 3
    mode = "quick" if args.quick else "full run" if args.full else "default"
    print(f"ntk-explain benchmark ({mode}, --device {args.device}); each line is a fresh process\n", flush=True)
    workloads = {
        "1": lambda tmp: workload_exact(args, tmp, n1, repeats),
        "2": lambda tmp: workload_scale(args, tmp, n2),
        "3": lambda tmp: workload_project(args, tmp, n3),
        "4": lambda tmp: workload_attribute(args, tmp, *ATTRIBUTE_SIZES["quick" if args.quick else "default"]),
        "5": lambda tmp: workload_distill(args, tmp, DISTILL_REDUCTION),
        "6": lambda tmp: workload_quality(args, tmp, n3 // 4),
        "7": lambda tmp: workload_targets(args, tmp),
        "8": lambda tmp: workload_generic(args, tmp, n3 // 4, repeats),
        "9": lambda tmp: workload_batches(args, tmp, 200 if args.quick else 800, repeats),
        "10": lambda tmp: workload_path(args, tmp, 32 if args.quick else None),
    }
    rows, raws = [], {}
    with tempfile.TemporaryDirectory(prefix="ntk-bench-") as tmp:
        for key in (args.only or ("1,2,3,4,5,6,8,9,10" if args.quick else "1,2,3,4,5,6,7,8,9,10")).split(","):
            found, raw = workloads[key](tmp)
            rows += found if isinstance(found, list) else [found]
            raws[key] = raw
    devices = {r["device"] for raw in raws.values() for r in raw.values() if "device" in r}
    print(f"\ndevice: {', '.join(sorted(devices)) or '?'}; ratio = baseline s / ours s (target ≥ 200×)\n")
    print(markdown(rows))
    if args.json:
        figures = {
            "mode": mode,
            "device": args.device,
            "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
        }
        figures["raw"] = raws
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\nfigures saved to {args.json}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few minutes: smaller N, single repeats, one seed, without workload 7"
    )
    parser.add_argument("--full", action="store_true", help="also run the naive method at N=512 (~15 GB)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--json", help="also save the figures to this JSON file")
    worker = parser.add_argument_group("worker (internal)")
    parser.add_argument("--only", help="comma-separated workloads to run (default: 1-10; all but 7 with --quick)")
    worker.add_argument(
        "--worker",
        choices=("ours", "naive", "project", "synthetic", "attribute", "weights", "quality", "generic", "batches"),
        help=argparse.SUPPRESS,
    )
    worker.add_argument("--m", type=int, default=1000, help=argparse.SUPPRESS)
    worker.add_argument("--tmp", help=argparse.SUPPRESS)
    worker.add_argument("--n", type=int, default=256, help=argparse.SUPPRESS)
    worker.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    worker.add_argument("--budget", type=int, default=TRACE_BUDGET, help=argparse.SUPPRESS)
    worker.add_argument("--save", help=argparse.SUPPRESS)
    worker.add_argument("--reference", help=argparse.SUPPRESS)
    worker.add_argument("--model", default="mlp", choices=("mlp", "cnn", *GENERIC_MODELS), help=argparse.SUPPRESS)
    worker.add_argument("--kind", default="gaussian", help=argparse.SUPPRESS)
    worker.add_argument("--projection", default="none", help=argparse.SUPPRESS)
    worker.add_argument("--dim", type=int, default=PROJ_DIM, help=argparse.SUPPRESS)
    worker.add_argument("--tile", type=int, default=PROJ_TILE, help=argparse.SUPPRESS)
    worker.add_argument("--seeds", type=int, default=3, help=argparse.SUPPRESS)
    worker.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)), flush=True)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
