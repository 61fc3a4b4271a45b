"""One training step's segment of the weight path, w(t) = w_s + t Δw_s for t ∈ [0, 1], and its integrated Jacobian.

By the fundamental theorem of calculus, f_{w_{s+1}}(x) − f_{w_s}(x) = [∫₀¹ J_{w(t)}(x) dt] Δw_s exactly. The integral
is taken by Gauss–Legendre quadrature on panels of [0, 1]: one panel where the point's quadrature of the left side
(a JVP, d/dt f(w(t), x)) already matches the exact change to `tolerance`, else halved until each panel does (kinks of
ReLU or max-pooling, where a unit switches within the step, are enclosed in tiny panels) and the smooth neighbours
merged back. Each point gets its own panels; points with the one panel [0, 1] share their nodes' weights.

Jacobians at weights shared by a batch come from the tangent engine when the segment has a proved plan (`tangents`):
one batched forward and C backward passes per weight state (one with the explained class alone), each state's terms
added in place (`features.jacobian`); per-point weights (split panels) take `vmap(jacrev)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import jacrev, jvp, vmap

from ntk_explain.features.jacobian import summed_jacobian
from ntk_explain.features.plan import TangentPlan
from ntk_explain.features.tangents import tangent_factors
from ntk_explain.loading.adapter import Batch, ModelAdapter

Panels = list[list[tuple[float, float]]]  # per point, its panels (a, b) in order, covering [0, 1]
SPLIT = 4  # a failing panel is cut into this many
SHARED = 4  # points per distinct t at which a JVP shares each t's weights instead of giving every point its own
MAX_ACTIVE = 4  # a point is refined while it has at most this many failing panels (kinks) at a level and its error
# halves at least every PATIENCE levels: more kinks than that in one step (a CNN trained with large steps), or rounding
# noise, stop it at about the cost of one panel (the stored residual says how exact the result is)
PATIENCE = 6


def _pieces(n: int, size: int) -> list[slice]:
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


@functools.cache
def gauss_legendre(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes t_q ∈ (0, 1) and weights ω_q (Σ ω_q = 1) of Q-point Gauss–Legendre quadrature on [0, 1]: exact for
    polynomials of degree ≤ 2Q − 1."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    return (x + 1) / 2, w / 2


@dataclass(frozen=True)
class Segment:
    """The segment w(t) = start + t·delta of the trained parameters (name → tensor, in order), with the fixed
    `constants` (buffers, frozen parameters); `net` evaluates the model on it, `tangents` (a plan of the trained
    parameters in the same order, proved on the model) gives batched Jacobians at shared weights."""

    net: ModelAdapter
    start: dict[str, Tensor]
    delta: dict[str, Tensor]
    constants: dict[str, Tensor]
    chunk: int = 256  # the most points of one vmapped JVP (each may carry its own weights)
    tangents: TangentPlan | None = None
    direction: dict[str, Tensor] | None = None  # the slopes' tangent v: Δw when None (the path kernel: the update
    # rebuilt from the recorded gradients, so that the quadrature's error is that of the identity it explains)

    def weights(self, t: float | Tensor) -> dict[str, Tensor]:
        """w(t) of the trained parameters."""
        return {n: self.start[n] + t * d for n, d in self.delta.items()}

    def _one(self, state: dict[str, Tensor], arrays: dict[str, Tensor], keyword: bool) -> Tensor:
        """f(x) (C,) of one point at `state`."""
        return self.net.functional(state, Batch({k: a.unsqueeze(0) for k, a in arrays.items()}, keyword))[0]

    def values(self, batch: Batch, t: float) -> Tensor:
        """f(w(t), x) (n, C) of the batch at one t, without gradients."""
        with torch.no_grad():
            return self.net.functional({**self.weights(t), **self.constants}, batch)

    def values_and_slopes(self, batch: Batch, t: Tensor) -> tuple[Tensor, Tensor]:
        """f(w(t_k), x_k) and J_{w(t_k)}(x_k) v (K, C) each, v the segment's `direction` (by default Δw: the slope
        d/dt f(w(t), x_k)): `t` (K,) per point, or one shared value (0-d)."""
        tangent = self.delta if self.direction is None else self.direction

        def one(tk: Tensor, arrays: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            params = {n: self.start[n] + tk * d for n, d in self.delta.items()}
            return jvp(lambda p: self._one({**p, **self.constants}, arrays, batch.keyword), (params,), (tangent,))

        if not t.dim():  # one t for every point: batched JVPs of the model (its samples independent), by dual numbers
            values, slopes = [], []
            with torch.no_grad(), forward_ad.dual_level():
                params = {n: forward_ad.make_dual(w, tangent[n]) for n, w in self.weights(t).items()}
                for rows in _pieces(len(batch), self.chunk):
                    value, slope = forward_ad.unpack_dual(
                        self.net.functional({**params, **self.constants}, batch[rows])
                    )
                    values.append(value)
                    slopes.append(slope)
            return torch.cat(values), torch.cat(slopes)
        if len(shared := torch.unique(t)) * SHARED <= len(t):  # few distinct t: each one's weights shared
            values, slopes = None, None
            for value in shared:
                rows = (t == value).nonzero().squeeze(1)
                v, d = self.values_and_slopes(batch[rows], value)
                values = v.new_empty((len(t), *v.shape[1:])) if values is None else values
                slopes = d.new_empty((len(t), *d.shape[1:])) if slopes is None else slopes
                values[rows], slopes[rows] = v, d
            return values, slopes
        parts = [vmap(one)(t[rows], dict(batch[rows].arrays)) for rows in _pieces(len(batch), self.chunk)]
        return torch.cat([v for v, _ in parts]), torch.cat([d for _, d in parts])

    def summed_jacobians(
        self, batch: Batch, nodes: Tensor, weights: Tensor, cotangents: Tensor | None = None
    ) -> Tensor:
        """Σ_q ω_q J_{w(t_q)}(x) (n, C, P) of the batch at the shared nodes t_q with weights ω_q; with `cotangents` u
        (n, K, C) the Jacobians of u f (n, K, P)."""
        if self.tangents is None:
            return sum(w * self.jacobians(batch, t, cotangents) for t, w in zip(nodes, weights, strict=True))
        parts = (
            tangent_factors(self.net, replace(self.tangents, params=self.weights(t)), batch, cotangents) for t in nodes
        )  # one state's factors at a time
        return summed_jacobian(self.tangents, parts, list(weights))

    def jacobians(self, batch: Batch, t: Tensor, cotangents: Tensor | None = None) -> Tensor:
        """J_{w(t_k)}(x_k) (n, C, P) over the trained parameters, flattened in order: `t` (n,) or shared (0-d); with
        `cotangents` u (n, K, C) the Jacobians of u f (n, K, P)."""
        if not t.dim() and self.tangents is not None:
            return self.summed_jacobians(batch, t[None], torch.ones(1, dtype=t.dtype, device=t.device), cotangents)
        names = list(self.delta)

        def one(tk: Tensor, arrays: dict[str, Tensor], u: Tensor | None) -> Tensor:
            params = {n: self.start[n] + tk * self.delta[n] for n in names}

            def outputs(p: dict[str, Tensor]) -> Tensor:
                f = self._one({**p, **self.constants}, arrays, batch.keyword)
                return f if u is None else u @ f

            jac = jacrev(outputs)(params)
            return torch.cat([jac[n].flatten(1) for n in names], dim=1)

        in_dims = (0 if t.dim() else None, 0, None if cotangents is None else 0)
        return vmap(one, in_dims=in_dims)(t, dict(batch.arrays), cotangents)


@dataclass(frozen=True)
class Quadrature:
    """Gauss–Legendre with `nodes` on each of `panels` equal parts of a panel (a composite rule; the parts' nodes are
    shared by every point, so they go through batched Jacobians); a panel is kept once its error is at most the
    point's tolerance, after at most `depth` splits."""

    nodes: int
    depth: int
    panels: int = 1

    @property
    def size(self) -> int:
        """The rule's nodes on one panel."""
        return self.nodes * self.panels

    def rule(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """Nodes t_q ∈ (0, 1) and weights ω_q (Σ ω_q = 1) of the composite rule on [0, 1]."""
        t, w = gauss_legendre(self.nodes)
        starts = np.arange(self.panels)[:, None] / self.panels
        t, w = (starts + t / self.panels).reshape(-1), np.tile(w / self.panels, self.panels)
        return torch.as_tensor(t, dtype=dtype, device=device), torch.as_tensor(w, dtype=dtype, device=device)

    def errors(self, segment: Segment, batch: Batch, pieces: list[Piece]) -> Tensor:
        """f(w(b)) − f(w(a)) − (b−a) Σ_q ω_q d/dt f(w(a + (b−a) t_q)) (K, C) of K panels, each of a point of `batch`,
        in one pass over their K·Q nodes."""
        nodes, weights = self.rule(pieces[0].fa.dtype, batch.device)
        a = torch.tensor([p.a for p in pieces], dtype=nodes.dtype, device=nodes.device)
        b = torch.tensor([p.b for p in pieces], dtype=nodes.dtype, device=nodes.device)
        t = (a[:, None] + (b - a)[:, None] * nodes).reshape(-1)
        rows = torch.as_tensor([p.point for p in pieces], device=batch.device).repeat_interleave(self.size)
        slopes = segment.values_and_slopes(batch[rows], t)[1].reshape(len(pieces), self.size, -1)
        change = torch.stack([p.fb - p.fa for p in pieces])
        return change - (b - a)[:, None] * torch.einsum("q,kqc->kc", weights, slopes)


@dataclass(frozen=True)
class Piece:
    """A panel [a, b] of the segment of point `point` with the values fa, fb (C,) there, and its error once known."""

    point: int
    a: float
    b: float
    fa: Tensor
    fb: Tensor
    error: Tensor | None = None


def _within(error: Tensor, tolerance: Tensor, point: int) -> bool:
    return float(error.abs().max()) <= float(tolerance[point])


def refine(
    quadrature: Quadrature, segment: Segment, batch: Batch, f0: Tensor, f1: Tensor, tolerance: Tensor
) -> tuple[Panels, Tensor]:
    """Each point's panels of [0, 1] and the error of its quadrature on them (T, C): f1 − f0 (the values at w_s and
    w_{s+1}) minus the summed panel estimates. `tolerance` (T,): the largest error a panel may keep."""
    panels: Panels = [[(0.0, 1.0)] for _ in range(len(f0))]
    errors = f1 - f0 - integrated_slopes(quadrature, segment, batch, panels)  # shared nodes: one panel
    failing = [i for i in range(len(f0)) if quadrature.depth and not _within(errors[i], tolerance, i)]
    active = [Piece(i, 0.0, 1.0, f0[i], f1[i], errors[i]) for i in failing]
    kept: dict[int, list[Piece]] = {i: [] for i in failing}
    stalled: dict[int, int] = {}  # levels in a row that did not halve a point's error
    dense: set[int] = set()  # points with too many kinks: kept on the one panel
    for level in range(quadrature.depth if active else 0):
        before = _total_error(active)
        parts = [h for p, h in zip(active, _split(segment, batch, active), strict=True) for h in h]
        parts = [replace(h, error=e) for h, e in zip(parts, quadrature.errors(segment, batch, parts), strict=True)]
        after = _total_error(parts)
        active = []
        for point, failing in _failing(parts, tolerance).items():
            stalled[point] = 0 if after[point] <= before[point] / 2 else stalled.get(point, 0) + 1
            if len(failing) > MAX_ACTIVE:  # more kinks than that in one step: refining does not pay
                dense.add(point)
            elif level < quadrature.depth - 1 and stalled[point] < PATIENCE:
                active += failing
        kept_now = {id(h) for h in active}
        for h in parts:
            if id(h) not in kept_now:
                kept[h.point].append(h)
        if not active:
            break
    kept = {point: pieces for point, pieces in kept.items() if point not in dense}
    for point, pieces in _merged(quadrature, segment, batch, kept, tolerance).items():
        panels[point] = [(p.a, p.b) for p in pieces]
        errors[point] = torch.stack([p.error for p in pieces]).sum(0)
    return panels, errors


def _total_error(pieces: list[Piece]) -> dict[int, float]:
    """Each point's summed largest error over its pieces."""
    total: dict[int, float] = {}
    for piece in pieces:
        total[piece.point] = total.get(piece.point, 0.0) + float(piece.error.abs().max())
    return total


def _failing(parts: list[Piece], tolerance: Tensor) -> dict[int, list[Piece]]:
    """Each point's panels beyond its tolerance, the largest error first."""
    failing: dict[int, list[Piece]] = {}
    for h in sorted(parts, key=lambda h: -float(h.error.abs().max())):
        if not _within(h.error, tolerance, h.point):
            failing.setdefault(h.point, []).append(h)
    return failing


def panel_tolerance(f_start: Tensor, f_stop: Tensor, steps: int, relative: float) -> Tensor:
    """The error a point's panel may keep (T,): `relative` × the point's largest change over the window, shared
    over its `steps` steps, but never below its logits' rounding noise (64 ε (1 + max |f|))."""
    eps = torch.finfo(f_stop.dtype).eps
    change = (f_stop - f_start).abs().amax(1)
    return torch.maximum(relative * change / steps, 64 * eps * (1 + f_stop.abs().amax(1)))


def _split(segment: Segment, batch: Batch, pieces: list[Piece]) -> list[list[Piece]]:
    """Each panel cut into SPLIT equal ones, with the values at the new ends (one pass for all)."""
    inner = [p.a + (p.b - p.a) * k / SPLIT for p in pieces for k in range(1, SPLIT)]
    rows = torch.as_tensor([p.point for p in pieces], device=batch.device).repeat_interleave(SPLIT - 1)
    t = torch.tensor(inner, dtype=pieces[0].fa.dtype, device=batch.device)
    values = segment.values_and_slopes(batch[rows], t)[0].reshape(len(pieces), SPLIT - 1, -1)
    cut = []
    for p, value in zip(pieces, values, strict=True):
        ends = [p.a, *inner[: SPLIT - 1], p.b]
        inner = inner[SPLIT - 1 :]
        fs = [p.fa, *value, p.fb]
        cut.append([replace(p, a=ends[k], b=ends[k + 1], fa=fs[k], fb=fs[k + 1]) for k in range(SPLIT)])
    return cut


def _merged(
    quadrature: Quadrature, segment: Segment, batch: Batch, kept: dict[int, list[Piece]], tolerance: Tensor
) -> dict[int, list[Piece]]:
    """Each point's panels in order, neighbours merged while the merged panel keeps within tolerance: passes over
    adjacent pairs, from even then odd positions, every point's pairs tried in one call, until a pass merges none."""
    queues = {point: sorted(pieces, key=lambda p: p.a) for point, pieces in kept.items()}
    offset, idle = 0, 0
    while idle < 2:
        tried = [(point, k) for point, queue in queues.items() for k in range(offset, len(queue) - 1, 2)]
        joined = [replace(queues[p][k], b=queues[p][k + 1].b, fb=queues[p][k + 1].fb) for p, k in tried]
        errors = quadrature.errors(segment, batch, joined) if joined else ()
        merges = [
            (p, k, replace(j, error=e))
            for (p, k), j, e in zip(tried, joined, errors, strict=True)
            if _within(e, tolerance, p)
        ]
        for point, k, piece in reversed(merges):  # from the right, so that positions stay valid
            queues[point][k : k + 2] = [piece]
        idle = 0 if merges else idle + 1
        offset = 1 - offset
    return queues


def integrated_jacobians(
    quadrature: Quadrature,
    segment: Segment,
    batch: Batch,
    panels: Panels,
    chunk: int,
    cotangents: Tensor | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Ĵ(x) = Σ_panels (b−a) Σ_q ω_q J_{w(a + (b−a) t_q)}(x) (T, C, P) of every point on its panels, `chunk` Jacobians
    at a time; with `cotangents` u (T, K, C) that of u f (T, K, P); `reduce`, a linear map of the last axis (a scaling,
    a projection), applied to each chunk as it is formed. Points of the one panel [0, 1] share each node's weights; the
    nodes of split panels go per point."""
    dtype = next(iter(segment.start.values())).dtype
    nodes, weights = quadrature.rule(dtype, batch.device)
    reduce = reduce or (lambda values: values)

    def of(rows: Tensor | slice) -> Tensor | None:
        return None if cotangents is None else cotangents[rows]

    whole = torch.as_tensor([i for i, p in enumerate(panels) if p == [(0.0, 1.0)]], dtype=torch.long)
    total: Tensor | None = None
    if len(whole) == len(panels):  # every point on the one panel: each chunk written in place
        for rows in _pieces(len(panels), chunk):
            part = reduce(segment.summed_jacobians(batch[rows], nodes, weights, of(rows)))
            if rows.stop - rows.start == len(panels):
                return part
            total = part.new_empty((len(panels), *part.shape[1:])) if total is None else total
            total[rows] = part
        return total
    for rows in whole.split(chunk) if len(whole) else ():
        rows = rows.to(batch.device)
        part = reduce(segment.summed_jacobians(batch[rows], nodes, weights, of(rows)))
        total = _added(total, part, rows, len(panels))
    point, t, w = _split_nodes(quadrature, panels, nodes, weights)
    for part in torch.arange(len(point)).split(chunk):
        rows = point[part.to(point.device)]
        jacobians = segment.jacobians(batch[rows], t[part.to(t.device)], of(rows))
        total = _added(total, reduce(w[part.to(w.device), None, None] * jacobians), rows, len(panels))
    if total is None:
        raise ValueError("no panels")
    return total


def _split_nodes(
    quadrature: Quadrature, panels: Panels, nodes: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The point, node t and weight (b−a) ω_q of every node of the split panels (points not on [0, 1] alone)."""
    split = [(i, a, b) for i, p in enumerate(panels) if p != [(0.0, 1.0)] for a, b in p]
    device = nodes.device
    point = torch.as_tensor([i for i, _, _ in split], dtype=torch.long, device=device)
    a = torch.tensor([a for _, a, _ in split], dtype=nodes.dtype, device=device)[:, None]
    width = torch.tensor([b - a for _, a, b in split], dtype=nodes.dtype, device=device)[:, None]
    return point.repeat_interleave(quadrature.size), (a + width * nodes).reshape(-1), (width * weights).reshape(-1)


def integrated_slopes(quadrature: Quadrature, segment: Segment, batch: Batch, panels: Panels) -> Tensor:
    """Ĵ(x) v (T, C) of every point on its panels, v the segment's `direction`: the JVPs at the nodes of
    `integrated_jacobians`, weighted alike (so Ĵ(x) v of Ĵ(x) formed there, to rounding)."""
    nodes, weights = quadrature.rule(next(iter(segment.start.values())).dtype, batch.device)
    whole = torch.as_tensor([i for i, p in enumerate(panels) if p == [(0.0, 1.0)]], dtype=torch.long)
    whole = whole.to(batch.device)
    total: Tensor | None = None
    if len(whole):
        part = sum(w * segment.values_and_slopes(batch[whole], t)[1] for t, w in zip(nodes, weights, strict=True))
        total = _added(total, part, whole, len(panels))
    point, t, w = _split_nodes(quadrature, panels, nodes, weights)
    if len(point):
        total = _added(total, w[:, None] * segment.values_and_slopes(batch[point], t)[1], point, len(panels))
    if total is None:
        raise ValueError("no panels")
    return total


def _added(total: Tensor | None, part: Tensor, rows: Tensor, n: int) -> Tensor:
    if total is None:
        total = part.new_zeros((n, *part.shape[1:]))
    return total.index_add_(0, rows.to(part.device), part)
