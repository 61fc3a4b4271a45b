"""Per-sample tangent features g_k(x) = ∂o_k(x)/∂θ, in factored form.

The output map o: R^C → R^K is either the logits themselves (K = C; full, diagonal and trace
kernels) or their scaled sum o(x) = Σ_c f_c(x)/√C (K = 1; the pseudo kernel, whose Gram is
(1/C)⟨Σ_c g_c, Σ_c g_c'⟩).

Parameters are split per layer between exact methods (Novak et al. 2022); `planning` decides which, and proves the
choice on probe rows:

- **factorised** (`nn.Linear`, ungrouped `nn.Conv1d`/`nn.Conv2d`): the weight gradient of one sample is a sum of
  outer products Σ_s δ_s a_sᵀ over its sites s (positions × calls: a layer applied twice has two
  sites), δ_s = ∂o/∂z_s (K × d_out) the gradient at the layer output and a_s (d_in) its input
  (a conv patch). A bias adds a constant 1 to a_s. Such a layer is described by δ (K, S, d_out)
  and ã (S, d_in + bias) and never forms its P-sized gradient. When S² makes its Gram dearer than the
  dense one (many positions; every grouped conv), the layer is **formed** instead: its gradient Σ_s δ_s ã_sᵀ is formed
  directly from δ and ã by one batched product (a conv's by one convolution backward with the samples as groups,
  from its input, without unfolding it), without jacrev, and joins the dense columns.
- **lookup** (`nn.Embedding`): a factorised layer whose input is the one-hot e_{i_s} of the token
  index i_s, so its weight gradient Σ_s δ_s e_{i_s}ᵀ (V × d) has the rows i_s only. It is described
  by δ (K, S, d) and the indices i (S,), never by one-hot vectors; the sites of `padding_idx` have δ = 0. When S²
  makes its Gram dearer than the dense one (a positional embedding: few rows, every one used), its gradient is
  formed instead, the rows Σ_{s: i_s = j} δ_s by one scatter-add, and joins the dense columns.
- **affine** (eval-mode `nn.BatchNorm*d`, `nn.LayerNorm`, `nn.GroupNorm`, `nn.RMSNorm`): y_s =
  γ ⊙ x̂_s + β at every site (position) s, with x̂ recomputed from the input by the module's own
  normalisation, so the gradients ∂o/∂γ = Σ_s δ_s ⊙ x̂_s and ∂o/∂β = Σ_s δ_s (K × channels) are
  formed directly, without jacrev, and join the dense columns.
- **dense** (every other parameter, and lookups whose S² makes the structure dearer): the per-sample
  Jacobian (K, P_dense), the generic path.

δ is obtained with the output-perturbation trick: z_s ← z_s + ε_s with ε = 0, and δ = ∂o/∂ε. The plan's `path`
says how: `batched`, one batched backward pass (one per output, vmapped) when no parameter is dense by Jacobian;
`vmap`, `torch.func.vmap(jacrev)` with them; `loop`, a per-sample loop of plain autograd backward passes (one per
output) for models that vmap cannot run (data-dependent control flow, `.item()`, RNNs).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from ntk_explain.errors import BadInputError
from ntk_explain.features import modules as structure
from ntk_explain.features.plan import Affine, Layer, Lookup, TangentPlan, output_map
from ntk_explain.kernel.factors import Factors
from ntk_explain.loading.adapter import Batch, ModelAdapter, as_adapter


def call_input(args: tuple, kwargs: dict) -> Tensor:
    """The input tensor of a structured module's call: its first argument, positional or by keyword."""
    return args[0] if args else next(iter(kwargs.values()))


@contextmanager
def instrumented(
    modules: Mapping[str, nn.Module],
    eps: Sequence[Sequence[Tensor]] | None,
    record: dict[str, list],
    expand: tuple[int, Sequence[Sequence[bool]]] | None = None,
) -> Iterator[None]:
    """Forward hooks that record each call's site inputs (and output shape) and add ε to its output. `expand`: (n,
    per module per call whether it is broadcast): the input and output of a broadcast call (batch axis 1) are taken
    as n equal rows, so that each sample gets its own δ. Without ε (a dry run), a call whose input the module's
    formula cannot take is recorded with site inputs None."""
    handles = []
    for index, (name, module) in enumerate(modules.items()):
        record[name] = []

        def hook(
            mod: nn.Module, args: tuple, kwargs: dict, out: Tensor, index: int = index, name: str = name
        ) -> Tensor:
            calls = record[name]
            try:
                sites = structure.site_inputs(mod, call_input(args, kwargs))
            except Exception:  # a dry run (eps None) records the call as one that does not fit the module's formula
                if eps is not None:
                    raise
                sites = None
            if sites is not None and expand is not None and expand[1][index][len(calls)]:
                sites, out = sites.expand(expand[0], *sites.shape[1:]), out.expand(expand[0], *out.shape[1:])
            calls.append((sites, tuple(out.shape)))
            return out if eps is None else out + eps[index][len(calls) - 1]

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tangent_factors(
    model: nn.Module | ModelAdapter, plan: TangentPlan, x: Tensor | Batch, cotangents: Tensor | None = None
) -> Factors:
    """Per-sample tangent features of the batch x (n rows), every sample independent, by the plan's `path`; with
    `cotangents` u (n, K, C) those of o_k(x_i) = Σ_c u_ikc f_c(x_i) instead of the plan's output map (the logits'
    features combined, so the plan of the logits holds; one-hot rows: each sample's own class).

    batched: δ of every sample from one batched forward and backward pass (K backward passes, vmapped, for K outputs):
    sample i's outputs depend on its input alone, so ∂Σ_i o_k(x_i)/∂z_s(x_i) is δ_ks(x_i). vmap: `torch.func.vmap(
    jacrev)` gives δ and the Jacobian parameters' gradients one sample at a time; loop: plain autograd does, sample by
    sample and output by output."""
    adapter, batch = as_adapter(model), Batch.of(x)
    named = dict(adapter.module.named_modules())
    structured = {s.module: named[s.module] for s in plan.structured}
    free = {name: plan.params[name].detach() for name in plan.jacobian}
    held = {name: p.detach() for name, p in plan.params.items() if name not in free}
    context = _Context(adapter, plan, structured, held, cotangents)
    n, k = len(batch), plan.outputs if cotangents is None else cotangents.shape[1]
    if plan.path == "batched" and not free:
        jac_free, (jac_eps, calls) = {}, _batched_deltas(context, batch)
    else:
        jac_free, jac_eps, calls = (_looped if plan.path == "loop" else _vmapped)(context, free, batch)
    module_of = list(structured.values())
    layers, formed = len(plan.layers), len(plan.layers) + len(plan.formed)
    first_formed_lookup = formed + len(plan.lookups)
    first_affine = len(plan.structured) - len(plan.affines)

    def deltas(i: int) -> Tensor:
        return _joined([structure.by_site(module_of[i], d, 2) for d in jac_eps[i]], dim=2)

    def sites(i: int) -> Tensor:
        conv = structure.is_conv(module_of[i])
        return _joined([structure.patches(module_of[i], a) if conv else a for a in calls[i]], dim=1)

    columns = {name: jac_free[name].reshape(n, k, -1) for name in free}
    for i, affine in enumerate(plan.affines, start=first_affine):
        columns |= _affine_columns(module_of[i], affine, jac_eps[i], calls[i])
    for i, layer in enumerate(plan.formed, start=layers):
        columns |= _formed_columns(module_of[i], layer, jac_eps[i], calls[i])
    for i, lookup in enumerate(plan.formed_lookups, start=first_formed_lookup):
        columns[lookup.weight] = lookup_columns(lookup, _unpadded(lookup, deltas(i), sites(i)), sites(i))
    dense = [columns[name] for name in plan.dense]
    lookups = range(formed, first_formed_lookup)
    return Factors(
        dense=torch.cat(dense, dim=2) if dense else _zeros(batch, (n, k, 0), plan.dtype),
        deltas=tuple(deltas(i) for i in range(layers)),
        inputs=tuple(_augment(layer, sites(i)) for i, layer in enumerate(plan.layers)),
        lookup_deltas=tuple(_unpadded(plan.lookups[i - formed], deltas(i), sites(i)) for i in lookups),
        indices=tuple(sites(i) for i in lookups),
    )


@dataclass(frozen=True)
class _Context:
    """What every path needs: the model, the plan, its structured modules (in `plan.structured` order), the
    parameters held fixed (the structured ones, whose gradients come from δ) and the cotangents (n, K, C), if any."""

    adapter: ModelAdapter
    plan: TangentPlan
    structured: dict[str, nn.Module]
    held: dict[str, Tensor]
    cotangents: Tensor | None = None

    def outputs(self, logits: Tensor, cotangents: Tensor | None) -> Tensor:
        """o (..., K) of logits (..., C): the plan's output map, or Σ_c u_kc f_c with the (matching) cotangents."""
        if self.cotangents is None:
            return output_map(logits, self.plan.output)
        return torch.einsum("...c,...kc->...k", logits, cotangents)


def _zeros(batch: Batch, shape: tuple[int, ...], dtype: torch.dtype, grad: bool = False) -> Tensor:
    return torch.zeros(shape, dtype=dtype, device=batch.device, requires_grad=grad)


def _graph(batch: Batch) -> bool:
    """Whether the features must be differentiable in the inputs: a floating input requires grad."""
    return torch.is_grad_enabled() and any(a.requires_grad for a in batch.arrays.values())


def _kept(t: Tensor, graph: bool) -> Tensor:
    """t with its graph when the features must be differentiable in the inputs, else detached."""
    return t if graph else t.detach()


def _unpadded(lookup: Lookup, delta: Tensor, rows: Tensor) -> Tensor:
    """δ (n, K, S, d) of a lookup with the sites of its padding row zeroed: that row's gradient is zero."""
    if lookup.padding_idx is None:
        return delta
    return delta * (rows != lookup.padding_idx)[:, None, :, None].to(delta.dtype)


def _batched_deltas(context: _Context, batch: Batch) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """δ of every call of every structured module (n, K, 1, *out) and its site inputs (`site_inputs`), from one
    batched forward pass with ε = 0 added to the outputs (views of one zero, not zeros of every output's size) and
    the backward passes of the K outputs summed over the batch; differentiable in the inputs when a floating input
    requires grad (as `vmap(jacrev)` is)."""
    plan, graph = context.plan, _graph(batch)
    record: dict[str, list] = {}
    n = len(batch)
    with torch.enable_grad():
        zero = _zeros(batch, (), plan.dtype, grad=True)
        eps = tuple(tuple(zero.expand(n, *shape[1:]) for shape in s.call_shapes) for s in plan.structured)
        expand = (n, [s.broadcast or (False,) * len(s.call_shapes) for s in plan.structured])
        with instrumented(context.structured, eps, record, expand):
            logits = context.adapter.functional({**plan.fixed, **context.held}, batch)
        o = context.outputs(logits, context.cotangents)  # (n, K)
        k = o.shape[-1]
        ones = torch.eye(k, dtype=o.dtype, device=o.device)[:, None, :].expand(k, *o.shape)
        flat = [e for calls in eps for e in calls]
        grads = torch.autograd.grad(
            o, flat, ones if k > 1 else ones[0], create_graph=graph, is_grads_batched=k > 1, materialize_grads=True
        )
    grads = iter(g if k > 1 else g[None] for g in grads)  # (K, n, *out)
    deltas = [[next(grads).movedim(0, 1)[:, :, None] for _ in calls] for calls in eps]
    return deltas, [[_kept(site, graph) for site, _ in record[m]] for m in context.structured]


def _vmapped(context: _Context, free: dict[str, Tensor], batch: Batch) -> tuple[dict[str, Tensor], list, list]:
    """(Jacobians of the free parameters (n, K, *shape), δ (n, K, 1, *out) and site inputs per structured call) by
    `vmap(jacrev)` over the samples, each a batch of one."""
    plan, structured = context.plan, context.structured

    def outputs(
        free_params: dict[str, Tensor], eps_one: tuple, arrays_one: dict[str, Tensor], cotangent: Tensor | None
    ) -> tuple:
        row = Batch({name: a.unsqueeze(0) for name, a in arrays_one.items()}, batch.keyword)
        record: dict[str, list] = {}
        with instrumented(structured, eps_one, record):
            logits = context.adapter.functional({**plan.fixed, **context.held, **free_params}, row)
        return context.outputs(logits[0], cotangent), tuple(tuple(s for s, _ in record[m]) for m in structured)

    n, cotangents = len(batch), context.cotangents
    eps = tuple(tuple(_zeros(batch, (n, *shape), plan.dtype) for shape in s.call_shapes) for s in plan.structured)
    in_dims = (None, 0, 0, None if cotangents is None else 0)
    (jac_free, jac_eps), calls = vmap(jacrev(outputs, argnums=(0, 1), has_aux=True), in_dims)(
        free, eps, dict(batch.arrays), cotangents
    )
    return jac_free, jac_eps, [[c[:, 0] for c in module_calls] for module_calls in calls]  # each sample's batch of one


def _looped(context: _Context, free: dict[str, Tensor], batch: Batch) -> tuple[dict[str, Tensor], list, list]:
    """What `_vmapped` gives, by plain autograd: for each sample a forward pass (a batch of one) and one backward
    pass per output (differentiable in the inputs when a floating input requires grad). Slow, but it runs every model
    that autograd runs."""
    plan, graph = context.plan, _graph(batch)
    jacobians, deltas, sites = [], [], []  # per sample
    for i in range(len(batch)):
        with torch.enable_grad():
            params = {name: p.detach().requires_grad_() for name, p in free.items()}
            eps = [[_zeros(batch, shape, plan.dtype, grad=True) for shape in s.call_shapes] for s in plan.structured]
            record: dict[str, list] = {}
            with instrumented(context.structured, eps, record):
                logits = context.adapter.functional({**plan.fixed, **context.held, **params}, batch[i : i + 1])
            o = context.outputs(logits[0], None if context.cotangents is None else context.cotangents[i])
            leaves = [*params.values(), *(e for calls in eps for e in calls)]
            last = len(o) - 1
            grads = [
                torch.autograd.grad(
                    o[k], leaves, retain_graph=graph or k < last, create_graph=graph, materialize_grads=True
                )
                for k in range(len(o))
            ]
        per_leaf = iter(torch.stack(g) for g in zip(*grads, strict=True))  # (K, *leaf)
        jacobians.append({name: next(per_leaf) for name in params})
        deltas.append([[next(per_leaf) for _ in calls] for calls in eps])
        sites.append([[_kept(site[0], graph) for site, _ in record[m]] for m in context.structured])

    def stacked(per_sample: list[list[list[Tensor]]]) -> list[list[Tensor]]:
        return [[torch.stack(call) for call in zip(*module, strict=True)] for module in zip(*per_sample, strict=True)]

    return {name: torch.stack([j[name] for j in jacobians]) for name in free}, stacked(deltas), stacked(sites)


def _summed(terms: Iterable[Tensor]) -> Tensor:
    """The sum of the calls' terms (the first as it is, without adding it to a zero)."""
    return functools.reduce(operator.add, terms)


def _joined(calls: Sequence[Tensor], dim: int) -> Tensor:
    """The sites of every call along `dim`; one call's as they are (a view in the layout the backward left)."""
    return torch.cat(list(calls), dim=dim) if len(calls) > 1 else calls[0]


def _formed_columns(
    module: nn.Module, layer: Layer, deltas: Sequence[Tensor], inputs: Sequence[Tensor]
) -> dict[str, Tensor]:
    """∂o/∂W = Σ_s δ_s a_sᵀ (n, K, numel) and ∂o/∂b = Σ_s δ_s (n, K, d_out) of a formed layer's selected weight
    and bias, the sites s running over every call: δ (n, K, 1, *out) and the call's site inputs per call."""
    columns = {}
    if layer.weight:
        terms = zip(deltas, inputs, strict=True)
        columns[layer.weight] = _summed(structure.weight_gradient(module, d, a) for d, a in terms)
    if layer.bias:
        columns[layer.bias] = _summed(structure.site_sum(module, d, 2) for d in deltas)
    return columns


def _affine_columns(
    module: nn.Module, affine: Affine, deltas: Sequence[Tensor], x_hats: Sequence[Tensor]
) -> dict[str, Tensor]:
    """∂o/∂γ = Σ_s δ_s ⊙ x̂_s and ∂o/∂β = Σ_s δ_s (n, K, channels) of the selected γ, β, the sites s running over
    the positions of every call: δ (n, K, 1, *out) and x̂ (n, *out) per call, multiplied in the output's layout
    and then summed by site (cheaper than reordering δ by site first)."""
    columns = {}
    if affine.weight:
        products = zip(deltas, x_hats, strict=True)
        columns[affine.weight] = _summed(structure.site_sum(module, d * x[:, None, None], 2) for d, x in products)
    if affine.bias:
        columns[affine.bias] = _summed(structure.site_sum(module, d, 2) for d in deltas)
    return columns


def lookup_columns(lookup: Lookup, delta: Tensor, rows: Tensor) -> Tensor:
    """∂o/∂E (n, K, V·d) of a formed lookup: row j holds Σ_{s: i_s = j} δ_s, from δ (n, K, S, d) and rows i (n, S)."""
    n, k, _, d = delta.shape
    table = delta.new_zeros((n, k, lookup.rows, d))
    table.scatter_add_(2, rows.long()[:, None, :, None].expand_as(delta), delta)
    return table.reshape(n, k, -1)


def _augment(layer: Layer, a: Tensor) -> Tensor:
    """ã = [a, 1] with the bias, [a] without, [1] for a bias alone: (n, S, d_in')."""
    ones = a.new_ones((*a.shape[:-1], 1))
    if layer.weight is None:
        return ones
    return torch.cat([a, ones], dim=-1) if layer.bias else a


def penultimate(model: nn.Module | ModelAdapter, x: Tensor | Batch) -> Tensor:
    """Conjugate-kernel features φ(x) (n, D): the input of the forward pass's last nn.Linear call."""
    adapter, batch = as_adapter(model), Batch.of(x)
    seen: list[Tensor] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(call_input(args, kwargs)), with_kwargs=True)
        for m in adapter.module.modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            adapter(batch)
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise BadInputError("the ck kernel needs a final nn.Linear layer; this model has none")
    return seen[-1].reshape(len(batch), -1)
