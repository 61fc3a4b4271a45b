"""Kernel surrogates of a network, scikit-learn shaped: `fit(K_train, y)`, `decision_function(K)`.

Both surrogates are linear in the kernel: s_c(x) = Σ_j W_cj κ(x, x_j) + b_c, with κ the (usually
cosine-normalised) kernel between x and the N training points, W (C, N), b (C,). This representer form
is what makes attribution exact: A_c(x, x_j) = W_cj κ(x, x_j) + b_c/N sums to s_c(x).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class FeatureKernel:
    """K = Φ Φᵀ kept as its features Φ (N, D): `K @ A = Φ (Φᵀ A)` costs O(N·D) per column; K is never formed.

    Stands in for the (N, N) kernel wherever the surrogates only multiply by it.
    """

    features: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.features.shape[0], self.features.shape[0])

    def to(self, *args: object, **kwargs: object) -> FeatureKernel:
        return FeatureKernel(self.features.to(*args, **kwargs))

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.features @ (self.features.T @ other)


Kernel = Tensor | FeatureKernel


def class_weights(targets: Tensor, classes: int, balanced: bool) -> Tensor:
    """Per-sample weights: 1, or N / (C_present · n_{y_i}) for `balanced` (scikit-learn's rule)."""
    if not balanced:
        return torch.ones(len(targets), dtype=torch.float64, device=targets.device)
    counts = torch.bincount(targets, minlength=classes).to(torch.float64)
    present = int((counts > 0).sum())
    return (len(targets) / (present * counts))[targets]


def glm_objective(kernel: Kernel, targets: Tensor, weights: Tensor, W: Tensor, b: Tensor, alpha: float) -> Tensor:
    """L(W, b) = (1/N) Σ_i w_i CE(softmax(W κ_i + b), y_i) + α ‖W‖²_F for κ (N, N), W (C, N)."""
    logits = kernel @ W.T + b
    return (weights * F.cross_entropy(logits, targets, reduction="none")).mean() + alpha * W.square().sum()


@dataclass
class KernelGLM:
    """Multinomial logistic regression on kernel rows (Engel et al.'s kGLM), full-batch L-BFGS.

    Minimises `glm_objective`; deterministic (no sampling), stops when the gradient's largest entry
    is below `tol` or after `max_iter` iterations; `converged_` says which.
    """

    alpha: float = 1e-4
    balanced: bool = False
    tol: float = 1e-6
    max_iter: int = 1000
    W_: Tensor = field(init=False, repr=False)
    b_: Tensor = field(init=False, repr=False)
    loss_: float = field(init=False, default=float("nan"))
    n_iter_: int = field(init=False, default=0)
    converged_: bool = field(init=False, default=False)

    def fit(
        self, kernel: Kernel, targets: Tensor, classes: int, on_evaluation: Callable[[], None] | None = None
    ) -> KernelGLM:
        """Fit on the train×train kernel (N, N) and class targets (N,) in [0, classes); `on_evaluation` is called
        after each evaluation of the objective (for progress)."""
        kernel = kernel.to(torch.float64)
        weights = class_weights(targets, classes, self.balanced)
        W = torch.zeros((classes, kernel.shape[1]), dtype=torch.float64, device=targets.device, requires_grad=True)
        b = torch.zeros(classes, dtype=torch.float64, device=targets.device, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [W, b],
            lr=1,
            max_iter=self.max_iter,
            tolerance_grad=self.tol,
            tolerance_change=0.0,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = glm_objective(kernel, targets, weights, W, b, self.alpha)
            loss.backward()
            if on_evaluation is not None:
                on_evaluation()
            return loss

        optimizer.step(closure)
        state = optimizer.state[optimizer._params[0]]
        self.n_iter_ = int(state.get("n_iter", 0))
        self.W_, self.b_ = W.detach(), b.detach()
        gradient = max(W.grad.abs().max().item(), b.grad.abs().max().item())
        self.converged_ = gradient <= self.tol
        self.loss_ = glm_objective(kernel, targets, weights, self.W_, self.b_, self.alpha).item()
        return self

    def decision_function(self, kernel: Kernel) -> Tensor:
        """Surrogate logits s (M, C) from the kernel (M, N) between the points and the training set."""
        return kernel.to(self.W_.dtype) @ self.W_.T + self.b_

    def predict_proba(self, kernel: Kernel) -> Tensor:
        return self.decision_function(kernel).softmax(-1)

    def predict(self, kernel: Kernel) -> Tensor:
        return self.decision_function(kernel).argmax(-1)


@dataclass
class KernelRidge:
    """Kernel ridge regression of the network's logits: (K + αN·I) Aᵀ = Y − ȳ, W = A, b = ȳ.

    The ridge λ = αN matches the kGLM's per-sample scaling of α (mean loss + α‖W‖²).
    """

    alpha: float = 1e-4
    W_: Tensor = field(init=False, repr=False)
    b_: Tensor = field(init=False, repr=False)

    def fit(self, kernel: Kernel, logits: Tensor) -> KernelRidge:
        """Fit on the train×train kernel (N, N) and the network's logits (N, C).

        For a FeatureKernel ΦΦᵀ, by Woodbury: (ΦΦᵀ + λI)⁻¹ Y = (Y − Φ (ΦᵀΦ + λI)⁻¹ Φᵀ Y) / λ.
        """
        kernel, logits = kernel.to(torch.float64), logits.to(torch.float64)
        n = kernel.shape[0]
        ridge = self.alpha * n
        self.b_ = logits.mean(0)
        centred = logits - self.b_
        if isinstance(kernel, FeatureKernel):
            phi = kernel.features
            small = phi.T @ phi + ridge * torch.eye(phi.shape[1], dtype=phi.dtype, device=phi.device)
            solution = (centred - phi @ torch.linalg.solve(small, phi.T @ centred)) / ridge
        else:
            system = kernel + ridge * torch.eye(n, dtype=kernel.dtype, device=kernel.device)
            solution = torch.linalg.solve(system, centred)
        self.W_ = solution.T.contiguous()
        return self

    decision_function = KernelGLM.decision_function
    predict_proba = KernelGLM.predict_proba
    predict = KernelGLM.predict
