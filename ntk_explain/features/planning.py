"""The tangent plan: which exact method each parameter takes, chosen from a dry run and proved on probe rows.

A module is structured (factorised, formed, lookup, affine: see `gradients`) only when the plan can account for every
use of its parameters, and then only when its formula reproduces plain autograd:

1. **Dry run** on two probe rows, with gradients enabled and PyTorch's plain code paths (no nested-tensor fast
   path): it records every call of the candidate modules (PyTorch's own classes, forward not overridden, parameters
   owned by one module), and, by a `TorchFunctionMode`, every operation that reads one of their parameters. A
   parameter read outside its module's own forward (a tied decoder `F.linear(h, enc.weight.t())`, an embedding
   reused as the head `h @ emb.weight.T`) makes the module generic, and so does a call whose input or output has
   no batch axis of the batch's size (a positional embedding of `arange(L)`); a batch axis of 1 is broadcast over
   the batch and handled.
2. **Self-check**: the tangent features of the probe rows by the plan, contracted with random output weights c, give
   every parameter's per-sample gradient Σ_k c_k ∂o_k/∂θ; plain autograd gives the same from one backward pass per
   row. Both run in float64 (when the copy fits `max_check_bytes`). A structured module whose parameters disagree
   goes to the generic path, and the check runs again; when the Jacobian parameters disagree under `vmap(jacrev)`,
   or vmap cannot run the model at all, the plan takes the per-sample loop.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ntk_explain.errors import BadInputError, first_line
from ntk_explain.features import modules as structure
from ntk_explain.features.plan import OUTPUTS, Affine, Layer, Lookup, TangentPlan, select_parameters
from ntk_explain.features.selfcheck import gradient_errors, in_dtype, output_weights
from ntk_explain.features.tangents import instrumented, tangent_factors
from ntk_explain.loading.adapter import Batch, ModelAdapter, as_adapter

CHECK_ROWS = 2
TOLERANCE = {torch.float64: 1e-6}  # relative error of a parameter's gradient; 1e-3 in lower precision
MAX_CHECK_BYTES = 1 << 30


class _Uses(TorchFunctionMode):
    """Records the parameters (by id) that an operation reads outside their owner module's own forward."""

    def __init__(self, owners: Mapping[int, nn.Module]) -> None:
        super().__init__()
        self.owners, self.stack, self.outside = owners, [], {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(leaf, Tensor) for leaf in tree_leaves(out)):  # not metadata (.shape, .dtype)
            inner = self.stack[-1] if self.stack else None
            for leaf in tree_leaves((args, kwargs)):
                owner = self.owners.get(id(leaf)) if isinstance(leaf, Tensor) else None
                if owner is not None and owner is not inner:
                    self.outside.setdefault(id(leaf), type(inner).__name__ if inner is not None else "the model")
        return out


@dataclass(frozen=True)
class _DryRun:
    """What the dry run saw: per candidate module its calls (site inputs, output shape), the parameters read outside
    their module (id → where), the activations of one sample and the logits' dtype."""

    calls: dict[str, list[tuple[Tensor, tuple[int, ...]]]]
    outside: dict[int, str]
    activation_numel: int
    dtype: torch.dtype
    classes: int


def _dry_run(adapter: ModelAdapter, rows: Batch, candidates: dict[str, nn.Module]) -> _DryRun:
    owners = {id(p): m for m in candidates.values() for p in m.parameters(recurse=False)}
    uses = _Uses(owners)
    activations = 0

    def enter(module: nn.Module, _args: tuple) -> None:
        uses.stack.append(module)

    def leave(_module: nn.Module, _args: tuple, out: object) -> None:
        nonlocal activations
        uses.stack.pop()
        activations += sum(t.numel() for t in tree_leaves(out) if isinstance(t, Tensor))

    record: dict[str, list] = {}
    handles = [
        nn.modules.module.register_module_forward_pre_hook(enter),
        nn.modules.module.register_module_forward_hook(leave),
    ]
    try:
        with torch.enable_grad(), instrumented(candidates, None, record), uses:
            logits = adapter(rows)
    finally:
        for handle in handles:
            handle.remove()
    calls = {name: [(s if s is None else s.detach(), shape) for s, shape in made] for name, made in record.items()}
    if logits.dim() != 2 or len(logits) != len(rows):
        shape = tuple(logits.shape)
        raise BadInputError(f"model output for {len(rows)} inputs must be logits (n, C), got shape {shape}")
    return _DryRun(calls, uses.outside, activations // len(rows), logits.dtype, logits.shape[1])


def _unstructured(name: str, module: nn.Module, dry: _DryRun, shared: set[int], n: int) -> str:
    """Why a candidate module cannot be structured, or ''."""
    own = list(module.parameters(recurse=False))
    if any(id(p) in shared for p in own):
        return "shared with another module"
    where = next((dry.outside[id(p)] for p in own if id(p) in dry.outside), None)
    if where is not None:
        return f"also used outside {name}'s forward (in {where})"
    if not dry.calls.get(name):
        return f"{name} is never called"
    for sites, shape in dry.calls[name]:
        if sites is None:
            return f"a call whose input does not fit {type(module).__name__}'s formula"
        if not shape or sites.dim() == 0 or sites.shape[0] != shape[0] or shape[0] not in (1, n):
            return f"a call without a batch axis (output {shape})"
    return ""


def _assemble(
    adapter: ModelAdapter,
    dry: _DryRun,
    params: dict[str, Tensor],
    output: str,
    outputs: int,
    excluded: Mapping[str, str],
    looped: bool,
    n: int,
    factorise: bool = False,
) -> TangentPlan:
    """The plan from the dry run: every module that can be structured is, the rest is generic (with the reason).

    By cost per pair of samples, with K outputs and S sites per sample: a Linear or conv is factorised when its Gram
    is no dearer than the dense one, S²(K·d_out + d_in) ≤ K·d_out·d_in, else formed (every grouped conv is formed;
    with `factorise` every ungrouped one is factorised: for Jacobians of many weight states formed at once); an
    Embedding is a lookup when S²(K·d + 1) ≤ K·V·d (the δ Gram and one index comparison per pair of sites), else
    formed; a normalisation layer is always affine (both ways give the same K × channels columns of γ and β).
    """
    model = adapter.module
    ids, shared = {id(p): name for name, p in params.items()}, _shared(model)
    kinds: dict[str, list] = {kind: [] for kind in ("layers", "formed", "lookups", "formed_lookups", "affines")}
    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in ids]
        if not own:
            continue
        method, reason = structure.structured_method(module)
        reason = excluded.get(name) or reason or _unstructured(name, module, dry, shared, n)
        if reason:
            for p in own:
                reasons.setdefault(ids[id(p)], reason)
            continue
        entry = _entry(name, module, method, dry.calls[name], ids)
        for p in own:  # e.g. weight_norm's g and v, from which a forward pre-hook makes the weight
            if ids[id(p)] not in (entry.weight, getattr(entry, "bias", None)):
                reasons[ids[id(p)]] = f"not {name}'s weight or bias"
        kinds[_kind(entry, module, outputs, factorise)].append(entry)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    plan = TangentPlan(
        params=params,
        layers=tuple(kinds["layers"]),
        formed=tuple(kinds["formed"]),
        lookups=tuple(kinds["lookups"]),
        affines=tuple(kinds["affines"]),
        formed_lookups=tuple(kinds["formed_lookups"]),
        fixed={name: t.detach() for name, t in state.items() if name not in params},
        outputs=outputs,
        output=output,
        dtype=dry.dtype,
        activation_numel=dry.activation_numel,
    )
    path = "loop" if looped else ("vmap" if plan.jacobian else "batched")
    return replace(plan, path=path, generic={name: reasons[name] for name in plan.jacobian})


def _shared(model: nn.Module) -> set[int]:
    """The parameters (by id) that several modules own."""
    count: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            count[id(p)] = count.get(id(p), 0) + 1
    return {key for key, owners in count.items() if owners > 1}


def _kind(entry: Layer | Lookup | Affine, module: nn.Module, outputs: int, factorise: bool) -> str:
    """Which of the plan's structured kinds an entry takes, by the cost rules of `_assemble`."""
    if isinstance(entry, Affine):
        return "affines"
    if isinstance(entry, Lookup):
        sparse = entry.sites**2 * (outputs * entry.features + 1) <= outputs * entry.rows * entry.features
        return "lookups" if sparse else "formed_lookups"
    factorised = entry.sites**2 * (outputs * entry.out_features + entry.in_features)
    cheap = factorise or factorised <= outputs * entry.out_features * entry.in_features
    return "layers" if cheap and getattr(module, "groups", 1) == 1 else "formed"  # a grouped conv is always formed


def _entry(name: str, module: nn.Module, method: str, calls: list, ids: dict[int, str]) -> Layer | Lookup | Affine:
    """The plan's entry for a structured module from its calls."""
    shapes = tuple((1, *shape[1:]) for _, shape in calls)
    broadcast = tuple(shape[0] == 1 for _, shape in calls)
    weight = ids.get(id(module.weight)) if getattr(module, "weight", None) is not None else None
    bias = ids.get(id(module.bias)) if getattr(module, "bias", None) is not None else None
    width = structure.width(module)
    if method == "affine":
        return Affine(name, weight, bias, width, shapes, broadcast)
    sites = sum(structure.sites_of_call(module, s, shape) for s, shape in calls)
    if method == "lookup":
        return Lookup(name, weight, module.num_embeddings, width, sites, shapes, broadcast, module.padding_idx)
    d_in = structure.in_width(module, calls[0][0])
    return Layer(name, weight, bias, d_in, width, sites, shapes, broadcast)


def plan_tangents(
    model: nn.Module | ModelAdapter,
    probe: Tensor | Batch,
    output: str = "logits",
    globs: tuple[str, ...] | None = None,
    *,
    verify: bool = True,
    max_check_bytes: int = MAX_CHECK_BYTES,
    factorise: bool = False,
) -> TangentPlan:
    """The plan of the selected parameters for the model's output map `output`, from the first two rows of `probe`
    (one row is taken twice), proved on them by the self-check unless `verify` is False; `factorise`: every ungrouped
    Linear and conv factorised (`_assemble`). The plan's `generic` says
    why each Jacobian parameter is not structured, its `check` the largest relative error, the check's time and
    dtype. A proved plan is kept for the same model, state, probe rows and options (`_fingerprint`), so that the
    kernels of one output map share one check."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}")
    adapter = as_adapter(model)
    rows = Batch.of(probe)[:CHECK_ROWS]
    rows = rows if len(rows) == CHECK_ROWS else rows.repeat(CHECK_ROWS)  # a batch axis of 1 is not the batch's
    params = select_parameters(adapter.module, globs)
    ids = {id(p) for p in params.values()}
    candidates = {
        name: m
        for name, m in adapter.module.named_modules()
        if structure.structured_method(m)[0] and any(id(p) in ids for p in m.parameters(recurse=False))
    }
    key = _fingerprint(adapter, rows, output, globs, max_check_bytes), factorise
    proved = _PROVED.setdefault(adapter.module, {})
    if verify and key in proved:
        return proved[key]
    began = time.perf_counter()
    dry = _dry_run(adapter, rows, candidates)
    outputs = 1 if output == "pseudo" else dry.classes
    excluded: dict[str, str] = {}

    def assemble(looped: bool) -> TangentPlan:
        return _assemble(adapter, dry, params, output, outputs, excluded, looped, CHECK_ROWS, factorise)

    if not verify:
        return assemble(False)
    plan, error, dtype = _proved(adapter, rows, assemble, excluded, max_check_bytes)
    check = {"error": error, "seconds": time.perf_counter() - began, "dtype": str(dtype).removeprefix("torch.")}
    proved[key] = replace(plan, check={**check, "rows": CHECK_ROWS})
    return proved[key]


_PROVED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, TangentPlan]] = weakref.WeakKeyDictionary()


def _fingerprint(adapter: ModelAdapter, rows: Batch, output: str, globs: tuple | None, max_check_bytes: int) -> tuple:
    """What a proved plan depends on: the options, the probe rows' bytes, and the model's modules (their names, types,
    modes and hooks) and state (every parameter and buffer, its storage, version, dtype, shape, device, grad flag)."""
    digest = hashlib.sha256()
    for name, a in rows.arrays.items():
        digest.update(f"{name}:{a.dtype}:{tuple(a.shape)}".encode())
        digest.update(a.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    model = adapter.module
    modules = tuple(
        (name, type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    )
    state = tuple(
        (name, t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device, t.requires_grad)
        for name, t in (*model.named_parameters(), *model.named_buffers())
    )
    options = (output, tuple(globs or ()), max_check_bytes, adapter.output_key, rows.keyword)
    return options, digest.hexdigest(), modules, state


def _proved(
    adapter: ModelAdapter,
    rows: Batch,
    assemble: Callable[[bool], TangentPlan],
    excluded: dict[str, str],
    max_check_bytes: int,
) -> tuple[TangentPlan, float, torch.dtype]:
    """(the plan that passes the self-check, its largest relative error, the check's dtype): a structured module whose
    parameters fail it goes to the generic path (`excluded`, with the reason); Jacobian parameters that fail under
    vmap, or a model that vmap cannot run, take the per-sample loop; a model whose features cannot be computed at
    all has every module generic."""
    plan = assemble(False)
    while True:
        try:
            plan, errors, dtype = _verified(adapter, plan, rows, max_check_bytes)
        except _Unrunnable as failure:
            if not plan.structured:
                raise BadInputError(f"the model cannot be differentiated on two probe rows: {failure}") from failure
            excluded.update({s.module: f"its structured form failed ({failure})" for s in plan.structured})
            plan = assemble(False)
            continue
        failed = {name: e for name, e in errors.items() if not e <= TOLERANCE.get(dtype, 1e-3)}
        owner = {n: s.module for s in plan.structured for n in (s.weight, getattr(s, "bias", None)) if n}
        demoted = {owner[name]: e for name, e in failed.items() if name in owner}
        if demoted:
            excluded.update({m: f"failed the self-check (relative error {e:.1e})" for m, e in demoted.items()})
            plan = assemble(plan.path == "loop")
        elif failed and plan.path != "loop":
            plan = assemble(True)
        elif failed:
            name, error = max(failed.items(), key=lambda item: item[1])
            raise BadInputError(
                f"the model's gradients are not reproducible on two probe rows ({name}: relative error {error:.1e}"
                " between two evaluations): is it random in eval mode?"
            )
        else:
            return plan, max(errors.values(), default=0.0), dtype


_FALLBACKS = {"batched": ("batched", "loop"), "vmap": ("vmap", "loop"), "loop": ("loop",)}


def _verified(
    adapter: ModelAdapter, plan: TangentPlan, rows: Batch, max_check_bytes: int
) -> tuple[TangentPlan, dict[str, float], torch.dtype]:
    """(the plan on the path that ran, the relative error of every parameter's gradient, the check's dtype): in
    float64 when the copies fit `max_check_bytes`, else (or when the model cannot run in float64) in the plan's
    dtype; on the plan's path, else (vmap cannot run the model) on the per-sample loop."""
    numel = plan.n_params + sum(t.numel() for t in plan.fixed.values())
    dtypes = [torch.float64] if 40 * numel <= max_check_bytes or plan.dtype == torch.float64 else []
    failure: Exception | None = None
    for dtype in dict.fromkeys([*dtypes, plan.dtype]):
        checked, batch = in_dtype(plan, rows, dtype)
        for path in _FALLBACKS[plan.path]:
            candidate = replace(checked, path=path)
            try:
                factors = tangent_factors(adapter, candidate, batch)
            except (torch.OutOfMemoryError, MemoryError):
                raise
            except Exception as exc:  # vmap cannot run the model, or it does not run in float64
                failure = failure or exc
                continue
            weights = output_weights(len(batch), plan.outputs, factors.dense)
            return replace(plan, path=path), gradient_errors(adapter, candidate, batch, factors, weights), dtype
    raise _Unrunnable(first_line(failure)) from failure


class _Unrunnable(Exception):
    """The plan's tangent features could not be computed on any path (the first failure's line)."""
