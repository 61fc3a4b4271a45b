"""Kernel inducing points (Nguyen et al. 2021) on the network's eNTK: synthetic inputs X_s and labels y_s minimising
the kernel ridge loss; its gradient w.r.t. X_s runs through the per-sample gradients φ(X_s) (double backward)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ntk_explain.kernel.normalize import unit_rows


def kip_loss(support: Tensor, target: Tensor, support_labels: Tensor, target_outputs: Tensor, reg: float) -> Tensor:
    """½ mean_t ‖K_ts (K_ss + λ tr(K_ss)/m I)⁻¹ y_s − y_t‖² for features φ_s (m, D), φ_t (b, D), y_s (m, C),
    y_t (b, C), with K = ⟨φ, φ'⟩."""
    k_ss = support @ support.T
    m = len(support)
    system = k_ss + reg * torch.trace(k_ss) / m * torch.eye(m, dtype=k_ss.dtype, device=k_ss.device)
    predicted = (target @ support.T) @ torch.linalg.solve(system, support_labels)
    return 0.5 * (predicted - target_outputs).square().sum(1).mean()


@dataclass
class KIP:
    """Kernel inducing points (Nguyen et al. 2021) on the network's eNTK: Adam on the synthetic inputs (and labels).

    Each step draws a class-balanced batch of real targets, recomputes φ(X_s) differentiably and descends
    `objective`; the targets' features are fixed (computed once by the caller). With `cosine` the kernel is the
    cosine-normalised one, K(x,x') = ⟨φ,φ'⟩/(‖φ‖‖φ'‖), as the surrogate sees it. Deterministic given `seed`.
    """

    steps: int = 200
    lr: float = 1e-2
    reg: float = 1e-3
    batch_size: int = 256
    learn_labels: bool = True
    cosine: bool = True
    seed: int = 0
    inputs_: Tensor = field(init=False, repr=False)
    labels_: Tensor = field(init=False, repr=False)
    losses_: list[float] = field(init=False, default_factory=list)

    def objective(
        self,
        feature_map: Callable[[Tensor], Tensor],
        inputs: Tensor,
        labels: Tensor,
        target_features: Tensor,
        target_outputs: Tensor,
    ) -> Tensor:
        """`kip_loss` of the support (inputs, labels) against targets (features φ_t, outputs y_t)."""
        support = feature_map(inputs)
        if self.cosine:
            support, target_features = unit_rows(support), unit_rows(target_features)
        return kip_loss(support, target_features, labels, target_outputs, self.reg)

    def fit(
        self,
        feature_map: Callable[[Tensor], Tensor],
        start: tuple[Tensor, Tensor],
        targets: KipTargets,
        on_step: Callable[[float], None] | None = None,
        *,
        state: KipState | None = None,
        checkpoint: Callable[[KipState], None] | None = None,
        every: int = 10,
    ) -> KIP:
        """Start from real inputs (m, …) with labels (m, C) (`start`) against the real `targets`. With `state` (an
        interrupted fit's, from `checkpoint`, called every `every` steps), go on from there: the result is that of
        an uninterrupted fit."""
        inputs, labels = start
        target_features, target_outputs, target_classes = targets.features, targets.outputs, targets.classes
        generator = torch.Generator().manual_seed(self.seed)
        x = inputs.detach().clone().requires_grad_(True)
        y = labels.detach().clone().requires_grad_(self.learn_labels)
        optimizer = torch.optim.Adam([x, y] if self.learn_labels else [x], lr=self.lr)
        self.losses_, first = [], 0
        if state is not None:
            first, self.losses_ = state.restore(x, y, optimizer, generator)
        by_class = [torch.nonzero(target_classes == c).flatten().cpu() for c in range(labels.shape[1])]
        by_class = [rows for rows in by_class if len(rows)]
        per_class = max(1, self.batch_size // len(by_class))
        for step in range(first, self.steps):
            batch = torch.cat(
                [rows[torch.randint(0, len(rows), (per_class,), generator=generator)] for rows in by_class]
            ).to(target_features.device)
            optimizer.zero_grad()
            loss = self.objective(feature_map, x, y, target_features[batch], target_outputs[batch])
            loss.backward()
            optimizer.step()
            self.losses_.append(loss.item())
            if on_step is not None:
                on_step(self.losses_[-1])
            if checkpoint is not None and (step + 1) % every == 0 and step + 1 < self.steps:
                checkpoint(KipState.of(step + 1, x, y, optimizer, generator, self.losses_))
        self.inputs_, self.labels_ = x.detach(), y.detach()
        return self


@dataclass(frozen=True)
class KipTargets:
    """kip's real targets: their features φ_t (N, D), the network's outputs y_t (N, C) and their classes (N,)."""

    features: Tensor
    outputs: Tensor
    classes: Tensor


@dataclass
class KipState:
    """Where a kip fit stands after `step` steps: the support, Adam's state, the generator's, the losses so far."""

    step: int
    inputs: Tensor
    labels: Tensor
    optimizer: dict
    generator: Tensor
    losses: list[float]

    @staticmethod
    def of(
        step: int, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator, losses: list
    ) -> KipState:
        return KipState(
            step, x.detach().clone(), y.detach().clone(), optimizer.state_dict(), generator.get_state(), [*losses]
        )

    def restore(
        self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> tuple[int, list[float]]:
        """Put the support, the optimiser and the generator back as they were; (the next step, the losses)."""
        with torch.no_grad():
            x.copy_(self.inputs)
            y.copy_(self.labels)
        optimizer.load_state_dict(self.optimizer)
        generator.set_state(self.generator)
        return self.step, [*self.losses]
