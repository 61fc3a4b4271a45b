"""What the structured methods of `gradients` know about the modules they take: which method a module allows, the
layout of its output sites, its site inputs, and its formed weight gradient.

A module is structured only when its forward is PyTorch's own: a subclass that overrides `forward` (a
weight-standardised conv, a channels-first LayerNorm) computes something else than the formula of its base class, so
it goes to the generic path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONVS = (nn.Conv1d, nn.Conv2d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AFFINES = (*_BATCH_NORMS, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_CHANNELS_FIRST = (*_CONVS, nn.GroupNorm, *_BATCH_NORMS)  # outputs (batch, channels, *positions)
_METHODS: dict[type[nn.Module], str] = {
    nn.Linear: "factorised",
    **dict.fromkeys(_CONVS, "factorised"),
    nn.Embedding: "lookup",
    **dict.fromkeys(_AFFINES, "affine"),
}
_OWN_CODE = ("forward", "_conv_forward")  # what a subclass must not override to keep its base's formula


def _base(module: nn.Module) -> type[nn.Module] | None:
    """The structured PyTorch class the module is an instance of, if any."""
    return next((base for base in type(module).__mro__ if base in _METHODS), None)


def structured_method(module: nn.Module) -> tuple[str | None, str]:
    """The structured method a module allows, 'factorised', 'lookup' or 'affine', or None with the reason.

    BatchNorm is affine only in eval mode with running statistics (per-sample x̂); an Embedding only without max_norm
    (which renormalises its weight in place) and scale_grad_by_freq; a conv only with zero padding of fixed, symmetric
    size.
    """
    base = _base(module)
    kind = type(module).__name__
    if base is None:
        return None, f"no structured form ({kind})"
    overridden = [name for name in _OWN_CODE if getattr(type(module), name, None) is not getattr(base, name, None)]
    if overridden:
        return None, f"{kind} overrides {base.__name__}.{overridden[0]}"
    if isinstance(module, _CONVS) and (module.padding_mode != "zeros" or conv_padding(module) is None):
        return None, f"{kind} with padding {module.padding!r} ({module.padding_mode})"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
        return None, f"{kind} with max_norm or scale_grad_by_freq"
    if isinstance(module, _BATCH_NORMS) and (module.training or module.running_mean is None):
        return None, f"{kind} with batch statistics"
    return _METHODS[base], ""


def conv_padding(conv: nn.Module) -> tuple[int, ...] | None:
    """The padding of each spatial axis of a conv, or None when it pads asymmetrically ('same' of an even span)."""
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding != "same":
        return tuple(conv.padding)
    spans = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    return None if any(span % 2 for span in spans) else tuple(span // 2 for span in spans)


def width(module: nn.Module) -> int:
    """Length of the vector each site of the module's output holds: d_out, d, or the channels γ scales."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _CONVS):
        return module.out_channels
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return math.prod(module.normalized_shape)
    return module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, _CONVS)


def in_width(module: nn.Module, site_input: Tensor) -> int:
    """d_in of a factorised layer: a Linear's input features, a conv's patch size C_in/groups·Π kernel."""
    if isinstance(module, _CONVS):
        return module.weight[0].numel()
    return site_input.shape[2]


def sites_of_call(module: nn.Module, site_input: Tensor, out_shape: tuple[int, ...]) -> int:
    """S of one call: a conv's output positions, the rows of a Linear's input, the indices of a lookup."""
    return math.prod(out_shape[2:]) if isinstance(module, _CONVS) else site_input.shape[1]


def by_site(module: nn.Module, t: Tensor, lead: int) -> Tensor:
    """A tensor shaped like one call's output, t (*lead, 1, *out), as (*lead, S_call, width): the channels at
    every position for convs, BatchNorm and GroupNorm (axis 1), the trailing axes for the other modules."""
    w = width(module)
    if isinstance(module, _CHANNELS_FIRST):
        return t.reshape(*t.shape[:lead], w, -1).transpose(-1, -2)
    return t.reshape(*t.shape[:lead], -1, w)


def site_sum(module: nn.Module, t: Tensor, lead: int) -> Tensor:
    """Σ_s of `by_site(module, t, lead)`: (*lead, width), summed along the memory order of t."""
    w = width(module)
    if isinstance(module, _CHANNELS_FIRST):
        return t.reshape(*t.shape[:lead], w, -1).sum(-1)
    return t.reshape(*t.shape[:lead], -1, w).sum(-2)


def normalised(module: nn.Module, a: Tensor) -> Tensor:
    """x̂ of one call: the module's own normalisation of its input a without the affine map (γ = 1, β = 0)."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(a, module.normalized_shape, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(a, module.num_groups, None, None, module.eps)
    return F.batch_norm(a, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)


def site_inputs(module: nn.Module, a: Tensor) -> Tensor:
    """What the sites of one call contribute besides δ, from the call's input a (a batch of b): the inputs a_s
    (b, S_call, d_in) of a Linear layer, the input a itself of a conv (its patches are a_s: `patches`), the rows
    i_s (b, S_call) of a lookup, or x̂ of an affine layer, in its output's own layout (b, *out)."""
    if isinstance(module, _CONVS):
        return a
    if isinstance(module, nn.Linear):
        return a.reshape(a.shape[0], -1, module.in_features)
    if isinstance(module, nn.Embedding):
        return a.reshape(a.shape[0], -1)
    return normalised(module, a)


def _geometry_2d(conv: nn.Module) -> tuple[tuple[int, int], ...]:
    """(kernel, stride, dilation, padding) of a conv as a Conv2d's: a Conv1d is a Conv2d of height 1."""
    padding = conv_padding(conv)
    values = (conv.kernel_size, conv.stride, conv.dilation, padding)
    return tuple(tuple(v) if len(v) == 2 else (1 if i < 3 else 0, v[0]) for i, v in enumerate(values))


def patches(conv: nn.Module, a: Tensor) -> Tensor:
    """The input patches a_s (b, S, C·Π kernel) of a zero-padded, ungrouped conv for its input a (b, C, *positions),
    as `F.unfold(a, ...).transpose(1, 2)` gives them, from Π kernel strided slices (twice as fast as unfold on CPU)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = _geometry_2d(conv)
    if a.dim() == 3:
        a = a.unsqueeze(2)
    b, c, h, w = a.shape
    rows, cols = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(a, (pw, pw, ph, ph))
    offsets = [(i * dh, j * dw) for i in range(kh) for j in range(kw)]
    shifted = [padded[:, :, i : i + sh * (rows - 1) + 1 : sh, j : j + sw * (cols - 1) + 1 : sw] for i, j in offsets]
    return torch.stack(shifted, dim=2).reshape(b, c * kh * kw, rows * cols).transpose(1, 2)


def weight_gradient(module: nn.Module, delta: Tensor, a: Tensor) -> Tensor:
    """Σ_s δ_s a_sᵀ (n, K, numel of the weight) of one call for δ (n, K, 1, *out): for a Linear layer from its inputs
    a (n, S, d_in) by one batched product; for a conv from its input a (n, C_in, *positions) by one convolution
    backward whose groups are the samples (times the conv's own groups): the weight gradient of group (i, g) is that
    of sample i's group g, without forming the patches."""
    n, k = delta.shape[:2]
    if not isinstance(module, _CONVS):
        return torch.einsum("nkso,nsi->nkoi", by_site(module, delta, 2), a).flatten(2)
    groups, out = module.groups, module.out_channels
    positions = delta.shape[4:]
    grad_out = delta.reshape(n, k, groups, out // groups, *positions).transpose(1, 2)  # (n, G, K, C_out/G, …)
    grad_out = grad_out.reshape(1, n * k * out, *positions)
    size = (n * k * out, *module.weight.shape[1:])
    flat = a.reshape(1, n * module.in_channels, *a.shape[2:])
    backward = torch.nn.grad.conv1d_weight if isinstance(module, nn.Conv1d) else torch.nn.grad.conv2d_weight
    padding = conv_padding(module)
    grad = backward(flat, size, grad_out, module.stride, padding, module.dilation, groups=n * groups)
    return grad.reshape(n, groups, k, -1).transpose(1, 2).reshape(n, k, -1)
