"""The exact path kernel (Bell et al. 2023) of a tile of explained points: each training point's contribution.

Over a window of steps [a, b) the network's change is a sum over segments, f_{w_b}(x) − f_{w_a}(x) =
Σ_s Ĵ_s(x) Δw_s with Ĵ_s(x) = ∫₀¹ J_{w_s(t)}(x) dt (C×P; `segments`). Each Δw_s is a linear function of the gradients
g_r of steps r ≤ s (`trajectory.optimizers`), so, with E_r(x) = Σ_{s≥r} η_s γ_{s,r} P_s ⊙ Ĵ_s(x) (steps outside the
window carry Ĵ_s = 0),

    f_{w_b}(x) − f_{w_a}(x) = Σ_i A(x, i) + D(x),
    A(x, i) = −Σ_{r: i∈B_r} ρ_r E_r(x) J_{w_r}(x_i)ᵀ ℓ'_{r,i}        (C,)
    D(x)    = −Σ_r E_r(x) (λ_c ⊙ w_r) − Σ_s η_s Ĵ_s(x) (λ_d ⊙ w_s)    (C,)

where ρ_r = 1/|B_r| for a mean loss (1 for a sum) and ℓ'_{r,i} = softmax(f_{w_r}(x_i)) − onehot(y_i) is the
cross-entropy's derivative in the logits. The path kernel is K_path(x, x_i) = Σ_{r: i∈B_r} ρ_r tr[E_r(x) J_{w_r}(x_i)ᵀ]
(with plain SGD, Σ_s (η_s/|B_s|) tr K_s(x, x_i), K_s(x, x') = ∫₀¹ J_{w_s(t)}(x) J_{w_s}(x')ᵀ dt); with the explained
class c alone, the class's own K_path^c(x, x_i) = Σ_{r: i∈B_r} ρ_r E_r(x)_c J_{w_r}(x_i)_cᵀ, and A(x, i)_c needs only
the row E_r(x)_c: one backward pass per node instead of C.

The sums over the training points follow by linearity, forwards, for every class at the cost of JVPs:
Σ_i A(x, i) = −Σ_s Ĵ_s(x) m_s and D(x) = −Σ_s Ĵ_s(x) d_s, with Δw_s = −m_s − d_s split into the gradient part
m_s = η_s P_s ⊙ (a ∇L_s + B_s), B_s = μ ⊙ B_{s−1} + b_s ∇L_s (the optimiser's momentum of the batch loss gradients
∇L_s = ρ_s Σ_{i∈B_s} J_{w_s}(x_i)ᵀ ℓ'_{s,i}), and the decay part d_s, the same of λ_c ⊙ w_s plus η_s λ_d ⊙ w_s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ntk_explain.analyses.segments import Panels, Quadrature, Segment, integrated_jacobians, integrated_slopes, refine
from ntk_explain.errors import BadInputError
from ntk_explain.features.projections import Projection
from ntk_explain.loading.adapter import Batch
from ntk_explain.trajectory.optimizers import Coefficients


@dataclass(frozen=True)
class Step:
    """Step `index` of a trajectory as the path kernel uses it: its segment, update coefficients, batch (training
    rows, inputs, labels), the loss's scale ρ, and whether the step is inside the explained window (else only its
    gradients matter, through the momentum of later steps)."""

    index: int
    segment: Segment
    coefficients: Coefficients
    rows: Tensor
    inputs: Batch
    labels: Tensor
    scale: float
    in_window: bool


@dataclass
class TileExplanation:
    """A tile's contributions A (T, N) of each point's explained class (T, N, C with every class), their sum over the
    training points Σ_i A (T, C) of every class (by linearity, −Σ_s Ĵ_s m_s with m_s the steps' gradient parts), the
    path kernel (T, N), the weight-decay part D (T, C), each window step's residual f_{w_{s+1}} − f_{w_s} + Ĵ_s (m_s +
    d_s) (T, S_window; the largest over classes) and the panels used over the window (T,)."""

    contributions: Tensor
    change: Tensor
    kernel: Tensor
    decay: Tensor
    step_error: Tensor
    panels: Tensor


def _flat(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def _shaped(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """A flat vector (P,) as tensors shaped like `like`'s, in its order."""
    parts = flat.split([t.numel() for t in like.values()])
    return {name: part.view_as(t) for (name, t), part in zip(like.items(), parts, strict=True)}


def _batch_gradients(step: Step, chunk: int) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
    """(rows, J_{w_s}(x_i) (b, C, P), ρ ℓ'_i (b, C)) of the step's batch, `chunk` points at a time."""
    segment = step.segment
    zero = torch.zeros((), dtype=next(iter(segment.start.values())).dtype, device=step.inputs.device)
    for start in range(0, len(step.inputs), chunk):
        part = step.inputs[start : start + chunk]
        logits = segment.values(part, 0.0)
        labels = step.labels[start : start + chunk]
        derivative = torch.softmax(logits, dim=1) - torch.nn.functional.one_hot(labels, logits.shape[1]).to(logits)
        yield step.rows[start : start + chunk], segment.jacobians(part, zero), step.scale * derivative


def loss_gradient(step: Step, chunk: int) -> Tensor:
    """∇L_s(w_s) = ρ Σ_{i∈B_s} J_{w_s}(x_i)ᵀ ℓ'_i (P,) of the step's batch loss, by backward passes of `chunk`
    points."""
    segment, total = step.segment, None
    params = {name: p.detach().requires_grad_() for name, p in segment.start.items()}
    for start in range(0, len(step.inputs), chunk):
        with torch.enable_grad():
            logits = segment.net.functional({**params, **segment.constants}, step.inputs[start : start + chunk])
            labels = step.labels[start : start + chunk]
            loss = step.scale * torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            part = _flat(dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)))
        total = part if total is None else total.add_(part)
    return total


def _add_batch(
    effective: Tensor,
    scale: float,
    step: Step,
    chunk: int,
    groups: list[tuple[int, Tensor]] | None,
    result: TileExplanation,
    projection: Projection | None,
) -> None:
    """For the batch of step r, with E_r = scale · `effective` (T, K, P; R E_r, T × K × d, with a projection R, and
    so R J(x_i)): A(x, i) −= ρ E_r(x) J(x_i)ᵀ ℓ'_i and
    K_path(x, x_i) += ρ tr[E_r(x) J(x_i)ᵀ] with every class (K = C, `groups` None); with the explained class alone
    (K = 1, `groups`: each class with its tile rows) A of that class and the class's own K_path(x, x_i) += ρ E_r(x)
    J_c(x_i)ᵀ."""
    t, k, p = effective.shape
    for rows, jacobians, derivative in _batch_gradients(step, chunk):
        jacobians = _projected(projection, jacobians)
        gradients = torch.einsum("bcp,bc->bp", jacobians, derivative)  # ρ J(x_i)ᵀ ℓ'_i
        if groups is None:
            result.contributions.index_add_(1, rows, torch.einsum("tcp,bp->tbc", effective, gradients), alpha=-scale)
            kernel = effective.reshape(t, k * p) @ jacobians.reshape(len(rows), k * p).T
        else:
            chosen = effective[:, 0]
            result.contributions.index_add_(1, rows, chosen @ gradients.T, alpha=-scale)
            kernel = chosen.new_empty((t, len(rows)))
            for c, members in groups:
                kernel[members] = chosen[members] @ jacobians[:, c].T
        result.kernel.index_add_(1, rows, kernel, alpha=scale * step.scale)


def _uniform(values: Tensor | float) -> float | None:
    """The one value of a coefficient vector (or a value itself), or None when it varies (param groups of other
    settings)."""
    if not isinstance(values, Tensor):
        return values
    first = values[0]
    return float(first) if bool((values == first).all()) else None


def explain_tile(
    tile: Batch,
    forward: Iterable[Step],
    backward: Iterable[Step],
    n_train: int,
    window: int,
    quadrature: Quadrature,
    tolerance: Tensor,
    chunk: int,
    classes: Tensor | None = None,
    projection: Projection | None = None,
) -> TileExplanation:
    """The path kernel of the points of `tile` (T rows) over `n_train` training points: the steps of the window
    (`window` of them) and the earlier ones whose gradients reach into it, given first to last (`forward`) and last
    to first (`backward`). `tolerance` (T,) bounds each quadrature panel's error, `chunk` the Jacobians formed at
    once; `classes` (T,) the class whose contributions are kept per point (None: every class); `projection` R: the
    unbiased projected contributions and kernel (`_backward`; the class sums and the decay stay exact)."""
    f_start, panels, result = None, {}, None
    m_buffer: Tensor | None = None  # Σ_{r≤s} γ'_{s,r} ∇L_r, the momentum of the gradient parts (b_s, μ_{s−1})
    d_buffer: Tensor | None = None  # the same of the coupled weight decay λ_c ⊙ w_r
    mu: Tensor | None = None  # μ_{s−1}
    for step in forward:
        segment, c = step.segment, step.coefficients
        w = _flat(segment.start)
        g, gd = loss_gradient(step, chunk), c.coupled * w
        m_buffer = c.b * g if m_buffer is None else m_buffer.mul_(mu).add_(c.b * g)
        d_buffer = c.b * gd if d_buffer is None else d_buffer.mul_(mu).add_(c.b * gd)
        mu = c.mu
        if not step.in_window:
            continue
        if f_start is None:
            f_start = segment.values(tile, 0.0)
            result = empty_explanation(len(tile), n_train, f_start.shape[1], window, w, classes is None)
        rate = c.eta * c.precondition
        gradient_part = rate * (c.a * g + m_buffer)  # m_s
        decay_part = rate * (c.a * gd + d_buffer) + c.eta * c.decoupled * w  # d_s
        update = replace(segment, direction=_shaped(-(gradient_part + decay_part), segment.start))  # v = −m_s − d_s
        f_stop = segment.values(tile, 1.0)
        pieces, error = refine(quadrature, update, tile, f_start, f_stop, tolerance)  # error = f_{s+1} − f_s − Ĵ_s v
        panels[step.index] = pieces
        result.step_error[:, len(panels) - 1] = error.abs().amax(1)
        result.panels += torch.as_tensor([len(p) for p in pieces], device=w.device)
        decay = None
        if bool(decay_part.any()):
            along = replace(segment, direction=_shaped(decay_part, segment.start))
            decay = -integrated_slopes(quadrature, along, tile, pieces)
            result.decay += decay
        change = f_stop - f_start - error  # Ĵ_s v = −Ĵ_s m_s − Ĵ_s d_s
        result.change += change if decay is None else change - decay
        f_start = f_stop
    if result is None:
        raise ValueError("explain_tile needs at least one step in the window")
    _backward(tile, backward, panels, quadrature, chunk, classes, result, projection)
    return result


def _projected(projection: Projection | None, values: Tensor) -> Tensor:
    """R values (..., d) of values (..., P), or the values themselves without a projection."""
    if projection is None:
        return values
    out = values.new_zeros((*values.shape[:-1], projection.dim))
    projection.add_projection(out, values, 0)
    return out


def _momentum(c: Coefficients, projection: Projection | None) -> tuple[Tensor | float, Tensor | float, Tensor | float]:
    """μ, a and b of a step: vectors (P,), or with a projection the one value each must take for R to commute with
    the recursion (BadInputError when a param group differs)."""
    if projection is None:
        return c.mu, c.a, c.b
    values = [_uniform(v) for v in (c.mu, c.a, c.b)]
    if any(v is None for v in values):
        raise BadInputError("--projection needs one momentum, dampening and nesterov setting for every parameter")
    return tuple(values)


def _any(value: Tensor | float) -> bool:
    return bool(value.any()) if isinstance(value, Tensor) else value != 0


def _backward(
    tile: Batch,
    steps: Iterable[Step],
    panels: dict[int, Panels],
    quadrature: Quadrature,
    chunk: int,
    classes: Tensor | None,
    result: TileExplanation,
    projection: Projection | None,
) -> None:
    """The contributions and the path kernel, steps last first: V_s = η_s P_s ⊙ Ĵ_s on the window steps' `panels`
    (of the explained class u = e_c alone when `classes` are given), H_s = V_s + μ ⊙ H_{s+1} in place, E_s = a ⊙ V_s
    + b_s ⊙ H_s formed only where a ≠ 0 or b varies. With a `projection` R (E[RᵀR] = I) every V_s and batch Jacobian
    is projected as it is formed, the recursion runs on R V_s (μ, a, b one value each), and A(x, i), K_path are the
    unbiased estimates from ⟨R E_r(x), R J(x_i)⟩."""
    carried: Tensor | None = None  # H_{s+1}
    cotangents, groups, points = None, None, chunk  # points: of a pass of test-side Jacobians, as big as chunk×C×P
    if classes is not None:
        points = chunk * result.decay.shape[1]
        cotangents = torch.nn.functional.one_hot(classes, result.decay.shape[1]).to(result.decay)[:, None, :]
        groups = [(int(c), (classes == c).nonzero().squeeze(1)) for c in torch.unique(classes)]
    for step in steps:
        segment, c = step.segment, step.coefficients
        mu, a, b = _momentum(c, projection)
        scaled = None
        if step.in_window:
            rate = c.eta * c.precondition

            def reduce(part: Tensor, rate: Tensor = rate) -> Tensor:
                return _projected(projection, part.mul_(rate))

            scaled = integrated_jacobians(  # V_s
                quadrature, segment, tile, panels[step.index], points, cotangents, reduce
            )
        if carried is not None and _any(mu):
            carried = carried.mul_(mu) if scaled is None else carried.mul_(mu).add_(scaled)
        else:
            carried = scaled
        if carried is None:
            break
        uniform = _uniform(b)
        if uniform is not None and (scaled is None or not _any(a)):
            effective, scale = carried, uniform
        else:
            effective, scale = (b * carried if scaled is None else a * scaled + b * carried), 1.0
        _add_batch(effective, scale, step, chunk, groups, result, projection)


def empty_explanation(
    n: int, n_train: int, n_classes: int, window: int, like: Tensor, every_class: bool
) -> TileExplanation:
    """A TileExplanation of zeros for n points (in `like`'s dtype and device), to accumulate into or receive."""
    return TileExplanation(
        contributions=like.new_zeros((n, n_train, n_classes) if every_class else (n, n_train)),
        change=like.new_zeros((n, n_classes)),
        kernel=like.new_zeros((n, n_train)),
        decay=like.new_zeros((n, n_classes)),
        step_error=like.new_zeros((n, window)),
        panels=torch.zeros(n, dtype=torch.long, device=like.device),
    )
