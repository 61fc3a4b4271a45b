"""Per-sample tangent features g_k(x) = ∂o_k(x)/∂θ, in factored form.

The output map o: R^C → R^K is either the logits themselves (K = C; full, diagonal and trace
kernels) or their scaled sum o(x) = Σ_c f_c(x)/√C (K = 1; the pseudo kernel, whose Gram is
(1/C)⟨Σ_c g_c, Σ_c g_c'⟩).

Parameters are split per layer into two exact methods (Novak et al. 2022):

- **factorised** (`nn.Linear`, `nn.Conv2d`): the weight gradient of one sample is a sum of
  outer products Σ_s δ_s a_sᵀ over its sites s (positions × calls: a layer applied twice has two
  sites), δ_s = ∂o/∂z_s (K × d_out) the gradient at the layer output and a_s (d_in) its input
  (a Conv2d patch). A bias adds a constant 1 to a_s. Such a layer is described by δ (K, S, d_out)
  and ã (S, d_in + bias) and never forms its P-sized gradient.
- **dense** (every other parameter, and factorisable layers whose S² makes factorising dearer):
  the per-sample Jacobian (K, P_dense) by `torch.func.jacrev`.

δ is obtained with the output-perturbation trick: z_s ← z_s + ε_s with ε = 0, and δ = ∂o/∂ε.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
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
class TangentPlan:
    """Which parameters are differentiated, and by which method.

    `params` holds every selected parameter in `named_parameters()` order (shared tensors once);
    it fixes the global coordinate order of θ used by projections.
    """

    params: dict[str, Tensor]
    dense: tuple[str, ...]
    layers: tuple[Layer, ...]
    fixed: dict[str, Tensor]  # unselected parameters and buffers, passed as they are
    outputs: int  # K
    output: str  # "logits" | "pseudo"
    activation_numel: int  # Σ numel of module outputs for one sample (memory estimate)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

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

    dense: (n, K, P_dense) Jacobian of the dense parameters, in `plan.dense` order.
    deltas[l]: (n, K, S_l, d_out) output gradients; inputs[l]: (n, S_l, d_in') layer inputs
    (with a trailing 1 when the bias is selected; only the 1 when the weight is not).
    """

    dense: Tensor
    deltas: tuple[Tensor, ...]
    inputs: tuple[Tensor, ...]

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


def _site_inputs(module: nn.Module, a: Tensor) -> Tensor:
    """The inputs a_s of every site of one call, (S_call, d_in); `a` is the call's input."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches[0].T
    return a.reshape(-1, module.in_features)


def _site_deltas(module: nn.Module, delta: Tensor) -> Tensor:
    """Output gradients of one call, (n, K, 1, *out) → (n, K, S_call, d_out)."""
    n, k = delta.shape[:2]
    if isinstance(module, nn.Conv2d):
        return delta.reshape(n, k, module.out_channels, -1).transpose(2, 3)
    return delta.reshape(n, k, -1, module.out_features)


def _factorisable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


@contextmanager
def _instrumented(
    modules: dict[str, nn.Module], eps: Sequence[Sequence[Tensor]] | None, record: dict[str, list]
) -> Iterator[None]:
    """Forward hooks that record each call's input (and output shape) and add ε to its output."""
    handles = []
    for index, (name, module) in enumerate(modules.items()):
        record[name] = []

        def hook(mod: nn.Module, args: tuple, out: Tensor, index: int = index, name: str = name) -> Tensor:
            calls = record[name]
            calls.append((args[0], tuple(out.shape)))
            return out if eps is None else out + eps[index][len(calls) - 1]

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _output_map(logits: Tensor, output: str) -> Tensor:
    """o(x): the logits (K = C) or their scaled sum Σ_c f_c/√C (K = 1), for one sample."""
    if output == "pseudo":
        return logits.sum(-1, keepdim=True) / math.sqrt(logits.shape[-1])
    return logits


def plan_tangents(
    model: nn.Module, example: Tensor, output: str = "logits", globs: Sequence[str] | None = None
) -> TangentPlan:
    """Choose the method of every selected parameter from a dry run on one sample `example`.

    A Linear/Conv2d layer whose weight and bias belong to it alone is factorised when the pair
    cost S²(K·d_out + d_in) is below the dense Gram's K·d_out·d_in; otherwise it is dense.
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
        if _factorisable(m)
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
    layers = []
    for name, module in candidates.items():
        calls = record[name]
        if not calls:
            continue
        sites = sum(_site_inputs(module, a).shape[0] for a, _ in calls)
        d_in = _site_inputs(module, calls[0][0]).shape[1]
        d_out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        if sites**2 * (outputs * d_out + d_in) > outputs * d_out * d_in:
            continue
        weight = ids.get(id(module.weight))
        bias = ids.get(id(module.bias)) if module.bias is not None else None
        layers.append(Layer(name, weight, bias, d_in, d_out, sites, tuple(s for _, s in calls)))
    factorised = {n for layer in layers for n in (layer.weight, layer.bias) if n}
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return TangentPlan(
        params=params,
        dense=tuple(n for n in params if n not in factorised),
        layers=tuple(layers),
        fixed={n: t.detach() for n, t in state.items() if n not in params},
        outputs=outputs,
        output=output,
        activation_numel=activation_numel,
    )


def tangent_factors(model: nn.Module, plan: TangentPlan, x: Tensor) -> Factors:
    """Per-sample tangent features of the batch x (n, *input_shape), every sample independent."""
    modules = dict(model.named_modules())
    layer_modules = {layer.module: modules[layer.module] for layer in plan.layers}
    factorised = {n: plan.params[n].detach() for layer in plan.layers for n in (layer.weight, layer.bias) if n}
    dense = {n: plan.params[n].detach() for n in plan.dense}
    n = x.shape[0]
    eps = tuple(tuple(x.new_zeros((n, *shape)) for shape in layer.call_shapes) for layer in plan.layers)

    def outputs(dense_params: dict[str, Tensor], eps_one: tuple, x_one: Tensor) -> tuple:
        record: dict[str, list] = {}
        state = {**plan.fixed, **factorised, **dense_params}
        with _instrumented(layer_modules, eps_one, record):
            logits = functional_call(model, state, (x_one.unsqueeze(0),))
        inputs = tuple(
            torch.cat([_site_inputs(layer_modules[layer.module], a) for a, _ in record[layer.module]])
            for layer in plan.layers
        )
        return _output_map(logits[0], plan.output), inputs

    (jac_dense, jac_eps), inputs = vmap(jacrev(outputs, argnums=(0, 1), has_aux=True), (None, 0, 0))(dense, eps, x)
    k = plan.outputs
    dense_cols = [jac_dense[name].reshape(n, k, -1) for name in plan.dense]
    deltas = tuple(
        torch.cat([_site_deltas(layer_modules[layer.module], d) for d in calls], dim=2)
        for layer, calls in zip(plan.layers, jac_eps, strict=True)
    )
    return Factors(
        dense=torch.cat(dense_cols, dim=2) if dense_cols else x.new_zeros((n, k, 0)),
        deltas=deltas,
        inputs=tuple(_augment(layer, a) for layer, a in zip(plan.layers, inputs, strict=True)),
    )


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
