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
(with plain SGD, Σ_s (η_s/|B_s|) tr K_s(x, x_i), K_s(x, x') = ∫₀¹ J_{w_s(t)}(x) J_{w_s}(x')ᵀ dt).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ntk_explain.analyses.segments import Quadrature, Segment, integrated_jacobians, refine
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
    training points Σ_i A (T, C) of every class, the path kernel (T, N), the weight-decay part D (T, C), each window
    step's quadrature error (T, S_window; the largest over classes) and the panels used over the window (T,)."""

    contributions: Tensor
    change: Tensor
    kernel: Tensor
    decay: Tensor
    step_error: Tensor
    panels: Tensor


def _flat(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


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


def _add_batch(
    effective: Tensor, scale: float, step: Step, chunk: int, classes: Tensor | None, result: TileExplanation
) -> None:
    """For the batch of step r, with E_r = scale · `effective` (T, C, P): A(x, i) −= ρ E_r(x) J(x_i)ᵀ ℓ'_i (of the
    explained class, or every class when `classes` is None), Σ_i A(x, i) alike for every class, and K_path(x, x_i)
    += ρ tr[E_r(x) J(x_i)ᵀ]."""
    t, c, p = effective.shape
    flat = effective.reshape(t, c * p)
    chosen = None if classes is None else effective[torch.arange(t, device=classes.device), classes]  # (T, P)
    for rows, jacobians, derivative in _batch_gradients(step, chunk):
        gradients = torch.einsum("bcp,bc->bp", jacobians, derivative)  # ρ J(x_i)ᵀ ℓ'_i
        if chosen is None:
            result.contributions.index_add_(1, rows, torch.einsum("tcp,bp->tbc", effective, gradients), alpha=-scale)
        else:
            result.contributions.index_add_(1, rows, chosen @ gradients.T, alpha=-scale)
        result.change -= scale * (effective @ gradients.sum(0))
        result.kernel.index_add_(1, rows, flat @ jacobians.reshape(len(rows), c * p).T, alpha=scale * step.scale)


def _uniform(values: Tensor) -> float | None:
    """The one value of a coefficient vector, or None when it varies (param groups of other settings)."""
    first = values[0]
    return float(first) if bool((values == first).all()) else None


def explain_tile(
    tile: Batch,
    steps: Iterable[Step],
    n_train: int,
    window: int,
    quadrature: Quadrature,
    tolerance: Tensor,
    chunk: int,
    classes: Tensor | None = None,
) -> TileExplanation:
    """The path kernel of the points of `tile` (T rows), `steps` given last first (the window's `window` steps, then
    the earlier ones whose gradients reach into it), over `n_train` training points; `tolerance` (T,) bounds each
    quadrature panel's error, `chunk` the Jacobians formed at once; `classes` (T,) the class whose contributions are
    kept per point (None: every class). H_s is updated in place; E_r is formed only where a ≠ 0 or b varies."""
    result: TileExplanation | None = None
    carried: Tensor | None = None  # H_{s+1}
    f_next: Tensor | None = None  # f_{w_{s+1}} of the tile
    seen = 0  # window steps done
    for step in steps:
        segment, c = step.segment, step.coefficients
        w = _flat(segment.start)
        if result is None:
            f_next = segment.values(tile, 1.0)
            result = _empty(len(tile), n_train, f_next.shape[1], window, w, classes is None)
        scaled = None
        if step.in_window:
            f0 = segment.values(tile, 0.0)
            pieces, error = refine(quadrature, segment, tile, f0, f_next, tolerance)
            integrated = integrated_jacobians(quadrature, segment, tile, pieces, chunk)
            seen += 1
            result.step_error[:, window - seen] = error.abs().amax(1)
            result.panels += torch.as_tensor([len(p) for p in pieces], device=w.device)
            if bool(c.decoupled.any()):
                result.decay -= integrated @ (c.eta * c.decoupled * w)
            scaled = integrated.mul_(c.eta * c.precondition)  # V_s
            f_next = f0
        if carried is not None and bool(c.mu.any()):
            carried = carried.mul_(c.mu) if scaled is None else carried.mul_(c.mu).add_(scaled)
        else:
            carried = scaled
        if carried is None:
            break
        b = _uniform(c.b)
        if b is not None and (scaled is None or not bool(c.a.any())):
            effective, scale = carried, b
        else:
            effective, scale = (c.b * carried if scaled is None else c.a * scaled + c.b * carried), 1.0
        _add_batch(effective, scale, step, chunk, classes, result)
        if bool(c.coupled.any()):
            result.decay -= scale * (effective @ (c.coupled * w))
    if result is None:
        raise ValueError("explain_tile needs at least one step")
    return result


def _empty(n: int, n_train: int, n_classes: int, window: int, like: Tensor, every_class: bool) -> TileExplanation:
    return TileExplanation(
        contributions=like.new_zeros((n, n_train, n_classes) if every_class else (n, n_train)),
        change=like.new_zeros((n, n_classes)),
        kernel=like.new_zeros((n, n_train)),
        decay=like.new_zeros((n, n_classes)),
        step_error=like.new_zeros((n, window)),
        panels=torch.zeros(n, dtype=torch.long, device=like.device),
    )
