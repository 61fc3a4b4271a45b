"""Per-sample tangent features g_k(x) = ∂o_k(x)/∂θ, in factored form.

The output map o: R^C → R^K is either the logits themselves (K = C; full, diagonal and trace
kernels) or their scaled sum o(x) = Σ_c f_c(x)/√C (K = 1; the pseudo kernel, whose Gram is
(1/C)⟨Σ_c g_c, Σ_c g_c'⟩).

Parameters are split per layer between exact methods (Novak et al. 2022):

- **factorised** (`nn.Linear`, `nn.Conv2d`): the weight gradient of one sample is a sum of
  outer products Σ_s δ_s a_sᵀ over its sites s (positions × calls: a layer applied twice has two
  sites), δ_s = ∂o/∂z_s (K × d_out) the gradient at the layer output and a_s (d_in) its input
  (a Conv2d patch). A bias adds a constant 1 to a_s. Such a layer is described by δ (K, S, d_out)
  and ã (S, d_in + bias) and never forms its P-sized gradient. When S² makes its Gram dearer than the
  dense one (many positions), the layer is **formed** instead: its gradient Σ_s δ_s ã_sᵀ is formed
  directly from δ and ã by one batched product (a Conv2d's by one convolution backward with the samples as groups,
  from its input, without unfolding it), without jacrev, and joins the dense columns.
- **lookup** (`nn.Embedding`): a factorised layer whose input is the one-hot e_{i_s} of the token
  index i_s, so its weight gradient Σ_s δ_s e_{i_s}ᵀ (V × d) has the rows i_s only. It is described
  by δ (K, S, d) and the indices i (S,), never by one-hot vectors.
- **affine** (eval-mode `nn.BatchNorm*d`, `nn.LayerNorm`, `nn.GroupNorm`, `nn.RMSNorm`): y_s =
  γ ⊙ x̂_s + β at every site (position) s, with x̂ recomputed from the input by the module's own
  normalisation, so the gradients ∂o/∂γ = Σ_s δ_s ⊙ x̂_s and ∂o/∂β = Σ_s δ_s (K × channels) are
  formed directly, without jacrev, and join the dense columns.
- **dense** (every other parameter, and lookups whose S² makes the structure dearer): the per-sample
  Jacobian (K, P_dense) by `torch.func.jacrev`.

δ is obtained with the output-perturbation trick: z_s ← z_s + ε_s with ε = 0, and δ = ∂o/∂ε, by one batched
backward pass (one per output, vmapped) when no parameter needs jacrev, else by `vmap(jacrev)` with them.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from ntk_explain.errors import BadInputError, UsageError

OUTPUTS = ("logits", "pseudo")


@dataclass(frozen=True)
class Layer:
    """A layer whose weight gradient is Σ_s δ_s ã_sᵀ over S sites per sample."""

    module: str
    weight: str | None  # parameter name when selected
    bias: str | None
    in_features: int  # d_in (Conv2d: C_in·kh·kw)
    out_features: int  # d_out
    sites: int  # S
    call_shapes: tuple[tuple[int, ...], ...]  # output shape of each call, batch of one


@dataclass(frozen=True)
class Lookup:
    """An embedding whose weight gradient is Σ_s δ_s e_{i_s}ᵀ (rows × features) over S sites (indices × calls)."""

    module: str
    weight: str
    rows: int  # V
    features: int  # d
    sites: int  # S
    call_shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Affine:
    """A normalisation layer y_s = γ ⊙ x̂_s + β at every site s, γ and β of `channels` entries."""

    module: str
    weight: str | None  # γ's name when selected
    bias: str | None  # β's
    channels: int
    call_shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class TangentPlan:
    """Which parameters are differentiated, and by which method.

    `params` holds every selected parameter in `named_parameters()` order (shared tensors once);
    it fixes the global coordinate order of θ used by projections. `dense` lists, in that order, the
    parameters whose gradients are columns of `Factors.dense`: those of `jacobian`, `formed` and `affines`.
    """

    params: dict[str, Tensor]
    layers: tuple[Layer, ...]  # factorised
    formed: tuple[Layer, ...]  # factorisable, but their gradients are formed: Σ_s δ_s ã_sᵀ
    lookups: tuple[Lookup, ...]
    affines: tuple[Affine, ...]
    fixed: dict[str, Tensor]  # unselected parameters and buffers, passed as they are
    outputs: int  # K
    output: str  # "logits" | "pseudo"
    dtype: torch.dtype  # of the logits, hence of every tangent feature
    activation_numel: int  # Σ numel of module outputs for one sample (memory estimate)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def dense(self) -> tuple[str, ...]:
        """The parameters that are not factorised nor lookups, in `params` order."""
        own = {n for layer in self.layers for n in (layer.weight, layer.bias)} | {e.weight for e in self.lookups}
        return tuple(name for name in self.params if name not in own)

    @property
    def jacobian(self) -> tuple[str, ...]:
        """The dense parameters differentiated by jacrev (those of `formed` and `affines` are formed from δ)."""
        formed = {name for module in (*self.formed, *self.affines) for name in (module.weight, module.bias)}
        return tuple(name for name in self.dense if name not in formed)

    @property
    def structured(self) -> tuple[Layer | Lookup | Affine, ...]:
        """Every module whose output gradient δ is taken: the layers, the formed layers, the lookups, the affines."""
        return (*self.layers, *self.formed, *self.lookups, *self.affines)

    def offsets(self) -> dict[str, int]:
        """Offset of each parameter's first coordinate in θ (flattened, `params` order)."""
        offsets, start = {}, 0
        for name, p in self.params.items():
            offsets[name] = start
            start += p.numel()
        return offsets


@dataclass
class Factors:
    """Tangent features of n samples.

    dense: (n, K, P_dense) gradients of the dense parameters, in `plan.dense` order.
    deltas[l]: (n, K, S_l, d_out) output gradients; inputs[l]: (n, S_l, d_in') layer inputs
    (with a trailing 1 when the bias is selected; only the 1 when the weight is not).
    lookup_deltas[e]: (n, K, S_e, d) output gradients of lookup e; indices[e]: (n, S_e) its rows i_s.
    """

    dense: Tensor
    deltas: tuple[Tensor, ...]
    inputs: tuple[Tensor, ...]
    lookup_deltas: tuple[Tensor, ...] = ()
    indices: tuple[Tensor, ...] = ()

    @property
    def n(self) -> int:
        return self.dense.shape[0]


def select_parameters(model: nn.Module, globs: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Trainable parameters whose name matches one of `globs` (all when None), shared ones once."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not globs:
        return named
    chosen = {n: p for n, p in named.items() if any(fnmatchcase(n, g) for g in globs)}
    if not chosen:
        raise UsageError(f"--params {','.join(globs)} matched no parameter (have: {', '.join(named)})")
    return chosen


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNELS_FIRST = (nn.Conv2d, nn.GroupNorm, *_BATCH_NORMS)  # outputs (batch, channels, *positions)


def _method(module: nn.Module) -> str | None:
    """The structured method a module allows: 'factorised', 'lookup', 'affine', or None (Jacobian only).

    BatchNorm is affine only in eval mode with running statistics (per-sample x̂); an Embedding only without
    padding_idx, max_norm and scale_grad_by_freq (which alter its gradient or its weight).
    """
    if isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return "factorised"
    if isinstance(module, nn.Embedding):
        plain = module.padding_idx is None and module.max_norm is None and not module.scale_grad_by_freq
        return "lookup" if plain else None
    if isinstance(module, _BATCH_NORMS):
        return "affine" if not module.training and module.running_mean is not None else None
    return "affine" if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) else None


def _width(module: nn.Module) -> int:
    """Length of the vector each site of the module's output holds: d_out, d, or the channels γ scales."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return math.prod(module.normalized_shape)
    return module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features


def _by_site(module: nn.Module, t: Tensor, lead: int) -> Tensor:
    """A tensor shaped like one call's output, t (*lead, 1, *out), as (*lead, S_call, width): the channels at
    every position for Conv2d, BatchNorm and GroupNorm (axis 1), the trailing axes for the other modules."""
    width = _width(module)
    if isinstance(module, _CHANNELS_FIRST):
        return t.reshape(*t.shape[:lead], width, -1).transpose(-1, -2)
    return t.reshape(*t.shape[:lead], -1, width)


def _site_sum(module: nn.Module, t: Tensor, lead: int) -> Tensor:
    """Σ_s of `_by_site(module, t, lead)`: (*lead, width), summed along the memory order of t."""
    width = _width(module)
    if isinstance(module, _CHANNELS_FIRST):
        return t.reshape(*t.shape[:lead], width, -1).sum(-1)
    return t.reshape(*t.shape[:lead], -1, width).sum(-2)


def _normalised(module: nn.Module, a: Tensor) -> Tensor:
    """x̂ of one call: the module's own normalisation of its input a without the affine map (γ = 1, β = 0)."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(a, module.normalized_shape, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(a, module.num_groups, None, None, module.eps)
    return F.batch_norm(a, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)


def _site_inputs(module: nn.Module, a: Tensor) -> Tensor:
    """What the sites of one call contribute besides δ, from the call's input a (a batch of b): the inputs a_s
    (b, S_call, d_in) of a Linear layer, the input a itself of a Conv2d (its patches are a_s: `_patches`), the rows
    i_s (b, S_call) of a lookup, or x̂ of an affine layer, in its output's own layout (b, *out), summed over sites by
    `_affine_columns` without reordering."""
    if isinstance(module, nn.Conv2d):
        return a
    if isinstance(module, nn.Linear):
        return a.reshape(a.shape[0], -1, module.in_features)
    if isinstance(module, nn.Embedding):
        return a.reshape(a.shape[0], -1)
    return _normalised(module, a)


def _patches(conv: nn.Conv2d, a: Tensor) -> Tensor:
    """The input patches a_s (b, S, C·kh·kw) of a zero-padded Conv2d for its input a (b, C, H, W), as
    `F.unfold(a, ...).transpose(1, 2)` gives them, from kh·kw strided slices (twice as fast as unfold on CPU)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    b, c, h, w = a.shape
    rows, cols = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(a, (pw, pw, ph, ph))
    offsets = [(i * dh, j * dw) for i in range(kh) for j in range(kw)]
    shifted = [padded[:, :, i : i + sh * (rows - 1) + 1 : sh, j : j + sw * (cols - 1) + 1 : sw] for i, j in offsets]
    return torch.stack(shifted, dim=2).reshape(b, c * kh * kw, rows * cols).transpose(1, 2)


@contextmanager
def _instrumented(
    modules: dict[str, nn.Module], eps: Sequence[Sequence[Tensor]] | None, record: dict[str, list]
) -> Iterator[None]:
    """Forward hooks that record each call's site inputs (and output shape) and add ε to its output."""
    handles = []
    for index, (name, module) in enumerate(modules.items()):
        record[name] = []

        def hook(mod: nn.Module, args: tuple, out: Tensor, index: int = index, name: str = name) -> Tensor:
            calls = record[name]
            calls.append((_site_inputs(mod, args[0]), tuple(out.shape)))
            return out if eps is None else out + eps[index][len(calls) - 1]

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _output_map(logits: Tensor, output: str) -> Tensor:
    """o(x) (..., K): the logits (..., C) (K = C) or their scaled sum Σ_c f_c/√C (K = 1)."""
    if output == "pseudo":
        return logits.sum(-1, keepdim=True) / math.sqrt(logits.shape[-1])
    return logits


def _selected(module: nn.Module, ids: dict[int, str]) -> tuple[str | None, str | None]:
    """The names of the module's weight and bias when they are selected."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return ids.get(id(weight)) if weight is not None else None, ids.get(id(bias)) if bias is not None else None


def plan_tangents(
    model: nn.Module, example: Tensor, output: str = "logits", globs: Sequence[str] | None = None
) -> TangentPlan:
    """Choose the method of every selected parameter from a dry run on one sample `example`.

    Only a module whose parameters belong to it alone is structured; with K outputs and S sites per sample,
    it is when its Gram costs no more per pair of samples than the dense one (K·(its P)):
    - Linear/Conv2d (factorised): S²(K·d_out + d_in) ≤ K·d_out·d_in, else formed (Σ_s δ_s ã_sᵀ by one batched
      product, the flops of jacrev's per-sample weight gradient without its batched-convolution overhead);
    - Embedding (lookup): S²(K·d + 1) ≤ K·V·d, the δ Gram and one index comparison per pair of sites;
    - normalisation (affine): always, since both ways give the same K × channels columns of γ and β from the same
      backward pass, δ ⊙ x̂ summed over sites instead of jacrev's vector-Jacobian products through γ ⊙ x̂ + β.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}")
    params = select_parameters(model, globs)
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    ids = {id(p): n for n, p in params.items()}
    candidates = {
        name: m
        for name, m in model.named_modules()
        if _method(m)
        and all(owners[id(p)] == 1 for p in m.parameters(recurse=False))
        and any(id(p) in ids for p in m.parameters(recurse=False))
    }
    activation_numel = 0

    def count(_m: nn.Module, _a: tuple, out: object) -> None:
        nonlocal activation_numel
        activation_numel += out.numel() if isinstance(out, Tensor) else 0

    record: dict[str, list] = {}
    counter = nn.modules.module.register_module_forward_hook(count)
    try:
        with torch.no_grad(), _instrumented(candidates, None, record):
            logits = model(example.unsqueeze(0))
    finally:
        counter.remove()
    outputs = _output_map(logits[0], output).shape[0]
    layers, formed, lookups, affines = [], [], [], []
    for name, module in candidates.items():
        calls = record[name]
        if not calls:
            continue
        shapes = tuple(shape for _, shape in calls)
        weight, bias = _selected(module, ids)
        width = _width(module)
        method = _method(module)
        if method == "affine":
            affines.append(Affine(name, weight, bias, width, shapes))
            continue
        sites = sum(math.prod(shape[2:]) if isinstance(module, nn.Conv2d) else s.shape[1] for s, shape in calls)
        if method == "lookup":
            if sites**2 * (outputs * width + 1) <= outputs * module.num_embeddings * width:
                lookups.append(Lookup(name, weight, module.num_embeddings, width, sites, shapes))
        else:
            d_in = (
                module.in_channels * math.prod(module.kernel_size)
                if isinstance(module, nn.Conv2d)
                else calls[0][0].shape[2]
            )
            factorised = sites**2 * (outputs * width + d_in) <= outputs * width * d_in
            (layers if factorised else formed).append(Layer(name, weight, bias, d_in, width, sites, shapes))
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return TangentPlan(
        params=params,
        layers=tuple(layers),
        formed=tuple(formed),
        lookups=tuple(lookups),
        affines=tuple(affines),
        fixed={n: t.detach() for n, t in state.items() if n not in params},
        outputs=outputs,
        output=output,
        dtype=logits.dtype,
        activation_numel=activation_numel,
    )


def tangent_factors(model: nn.Module, plan: TangentPlan, x: Tensor) -> Factors:
    """Per-sample tangent features of the batch x (n, *input_shape), every sample independent.

    Without Jacobian parameters, δ of every sample comes from one batched forward and backward pass (K backward
    passes, vmapped, for K outputs): sample i's outputs depend on its input alone, so ∂Σ_i o_k(x_i)/∂z_s(x_i) is
    δ_ks(x_i). With them, `torch.func.vmap(jacrev)` gives both, one sample at a time."""
    modules = dict(model.named_modules())
    structured = {s.module: modules[s.module] for s in plan.structured}
    free = {name: plan.params[name].detach() for name in plan.jacobian}
    held = {name: p.detach() for name, p in plan.params.items() if name not in free}
    n, k = x.shape[0], plan.outputs
    first_affine = len(plan.structured) - len(plan.affines)

    def outputs(free_params: dict[str, Tensor], eps_one: tuple, x_one: Tensor) -> tuple:
        record: dict[str, list] = {}
        with _instrumented(structured, eps_one, record):
            logits = functional_call(model, {**plan.fixed, **held, **free_params}, (x_one.unsqueeze(0),))
        return _output_map(logits[0], plan.output), tuple(tuple(s for s, _ in record[m]) for m in structured)

    if free:
        eps = tuple(
            tuple(x.new_zeros((n, *shape), dtype=plan.dtype) for shape in s.call_shapes) for s in plan.structured
        )
        (jac_free, jac_eps), calls = vmap(jacrev(outputs, argnums=(0, 1), has_aux=True), (None, 0, 0))(free, eps, x)
        calls = [[c[:, 0] for c in module_calls] for module_calls in calls]  # each sample's batch of one
    else:
        jac_free, (jac_eps, calls) = {}, _batched_deltas(model, plan, structured, held, x)
    module_of = [structured[s.module] for s in plan.structured]
    layers, formed = len(plan.layers), len(plan.layers) + len(plan.formed)

    def deltas(i: int) -> Tensor:
        return _joined([_by_site(module_of[i], d, 2) for d in jac_eps[i]], dim=2)

    def sites(i: int) -> Tensor:
        return _joined(
            [_patches(module_of[i], a) if isinstance(module_of[i], nn.Conv2d) else a for a in calls[i]], dim=1
        )

    columns = {name: jac_free[name].reshape(n, k, -1) for name in free}
    for i, affine in enumerate(plan.affines, start=first_affine):
        columns |= _affine_columns(module_of[i], affine, jac_eps[i], calls[i])
    for i, layer in enumerate(plan.formed, start=layers):
        columns |= _formed_columns(module_of[i], layer, jac_eps[i], calls[i])
    dense = [columns[name] for name in plan.dense]
    return Factors(
        dense=torch.cat(dense, dim=2) if dense else x.new_zeros((n, k, 0), dtype=plan.dtype),
        deltas=tuple(deltas(i) for i in range(layers)),
        inputs=tuple(_augment(layer, sites(i)) for i, layer in enumerate(plan.layers)),
        lookup_deltas=tuple(deltas(i) for i in range(formed, first_affine)),
        indices=tuple(sites(i) for i in range(formed, first_affine)),
    )


def _batched_deltas(
    model: nn.Module,
    plan: TangentPlan,
    structured: dict[str, nn.Module],
    params: dict[str, Tensor],
    x: Tensor,
) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """δ of every call of every structured module (n, K, 1, *out) and its site inputs (`_site_inputs`), from one
    batched forward pass with ε = 0 added to the outputs (views of one zero, not zeros of every output's size) and
    the backward passes of the K outputs summed over the batch; differentiable in x when x requires grad (as
    `vmap(jacrev)` is)."""
    graph = torch.is_grad_enabled() and x.requires_grad
    record: dict[str, list] = {}
    with torch.enable_grad():
        zero = x.new_zeros((), dtype=plan.dtype, requires_grad=True)
        n = x.shape[0]
        eps = tuple(tuple(zero.expand(n, *shape[1:]) for shape in s.call_shapes) for s in plan.structured)
        with _instrumented(structured, eps, record):
            logits = functional_call(model, {**plan.fixed, **params}, (x,))
        o = _output_map(logits, plan.output)  # (n, K)
        k = o.shape[-1]
        ones = torch.eye(k, dtype=o.dtype, device=o.device)[:, None, :].expand(k, *o.shape)
        flat = [e for calls in eps for e in calls]
        grads = torch.autograd.grad(
            o, flat, ones if k > 1 else ones[0], create_graph=graph, is_grads_batched=k > 1, materialize_grads=True
        )
    grads = iter(g if k > 1 else g[None] for g in grads)  # (K, n, *out)
    deltas = [[next(grads).movedim(0, 1)[:, :, None] for _ in calls] for calls in eps]
    return deltas, [[site if graph else site.detach() for site, _ in record[m]] for m in structured]


def _summed(terms: Iterable[Tensor]) -> Tensor:
    """The sum of the calls' terms (the first as it is, without adding it to a zero)."""
    return functools.reduce(operator.add, terms)


def _joined(calls: Sequence[Tensor], dim: int) -> Tensor:
    """The sites of every call along `dim`; one call's as they are (a view in the layout the backward left)."""
    return torch.cat(list(calls), dim=dim) if len(calls) > 1 else calls[0]


def _formed_columns(
    module: nn.Module, layer: Layer, deltas: Sequence[Tensor], inputs: Sequence[Tensor]
) -> dict[str, Tensor]:
    """∂o/∂W = Σ_s δ_s a_sᵀ (n, K, d_out·d_in) and ∂o/∂b = Σ_s δ_s (n, K, d_out) of a formed layer's selected weight
    and bias, the sites s running over every call: δ (n, K, 1, *out) and the call's site inputs per call."""
    columns = {}
    if layer.weight:
        columns[layer.weight] = _summed(_weight_gradient(module, d, a) for d, a in zip(deltas, inputs, strict=True))
    if layer.bias:
        columns[layer.bias] = _summed(_site_sum(module, d, 2) for d in deltas)
    return columns


def _weight_gradient(module: nn.Module, delta: Tensor, a: Tensor) -> Tensor:
    """Σ_s δ_s a_sᵀ (n, K, d_out·d_in) of one call for δ (n, K, 1, *out): for a Linear layer from its inputs a
    (n, S, d_in) by one batched product; for a Conv2d from its input a (n, C, H, W) by one convolution backward with
    the samples as groups (the weight gradient of group i is sample i's), without forming the patches."""
    n, k = delta.shape[:2]
    if not isinstance(module, nn.Conv2d):
        return torch.einsum("nkso,nsi->nkoi", _by_site(module, delta, 2), a).flatten(2)
    grad_out = delta.reshape(1, n * k * module.out_channels, *delta.shape[-2:])
    size = (n * k * module.out_channels, module.in_channels, *module.kernel_size)
    flat = a.reshape(1, n * module.in_channels, *a.shape[2:])
    grad = torch.nn.grad.conv2d_weight(flat, size, grad_out, module.stride, module.padding, module.dilation, groups=n)
    return grad.reshape(n, k, -1)


def _affine_columns(
    module: nn.Module, affine: Affine, deltas: Sequence[Tensor], x_hats: Sequence[Tensor]
) -> dict[str, Tensor]:
    """∂o/∂γ = Σ_s δ_s ⊙ x̂_s and ∂o/∂β = Σ_s δ_s (n, K, channels) of the selected γ, β, the sites s running over
    the positions of every call: δ (n, K, 1, *out) and x̂ (n, *out) per call, multiplied in the output's layout
    and then summed by site (cheaper than reordering δ by site first)."""
    columns = {}
    if affine.weight:
        products = zip(deltas, x_hats, strict=True)
        columns[affine.weight] = _summed(_site_sum(module, d * x[:, None, None], 2) for d, x in products)
    if affine.bias:
        columns[affine.bias] = _summed(_site_sum(module, d, 2) for d in deltas)
    return columns


def _augment(layer: Layer, a: Tensor) -> Tensor:
    """ã = [a, 1] with the bias, [a] without, [1] for a bias alone: (n, S, d_in')."""
    ones = a.new_ones((*a.shape[:-1], 1))
    if layer.weight is None:
        return ones
    return torch.cat([a, ones], dim=-1) if layer.bias else a


def penultimate(model: nn.Module, x: Tensor) -> Tensor:
    """Conjugate-kernel features φ(x) (n, D): the input of the forward pass's last nn.Linear call."""
    seen: list[Tensor] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise BadInputError("the ck kernel needs a final nn.Linear layer; this model has none")
    return seen[-1].reshape(x.shape[0], -1)
