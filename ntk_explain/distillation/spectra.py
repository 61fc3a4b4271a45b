"""Diagnostics of a distilled support: eigen-spectra, effective rank and r_ε, kernel alignment, nearest real points."""

from __future__ import annotations

import torch
from torch import Tensor

from ntk_explain.kernel.normalize import unit_rows


def spectrum(features: Tensor) -> Tensor:
    """Eigenvalues (descending) of K = ΦΦᵀ for Φ (n, D): the squared singular values, min(n, D) of them."""
    return torch.linalg.svdvals(features.double()).square()


def effective_rank(eigenvalues: Tensor) -> float:
    """exp(−Σ p_i log p_i), p_i = λ_i / Σ_j λ_j over the positive λ; 0 for a zero spectrum."""
    positive = eigenvalues[eigenvalues > 0].double()
    if not len(positive):
        return 0.0
    p = positive / positive.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def rank_at(eigenvalues: Tensor, eps: float) -> int:
    """r_ε: the fewest leading eigenvalues whose sum is at least (1 − ε) Σ λ (λ < 0 counted as 0)."""
    lam = eigenvalues.double().clamp_min(0).sort(descending=True).values
    total = lam.sum()
    if total <= 0:
        return 0
    return min(len(lam), int((lam.cumsum(0) < (1 - eps) * total).sum()) + 1)


def class_ranks(features: Tensor, classes: Tensor, n_classes: int, eps: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Per class c, of K_c = Φ_cΦ_cᵀ: the effective rank (C,) and r_ε for every ε (C, len(eps)); 0 for no points."""
    entropy = torch.zeros(n_classes, dtype=torch.float64)
    ranks = torch.zeros((n_classes, len(eps)), dtype=torch.int64)
    for c in range(n_classes):
        rows = features[classes == c]
        if len(rows):
            lam = spectrum(rows)
            entropy[c] = effective_rank(lam)
            ranks[c] = torch.tensor([rank_at(lam, e) for e in eps])
    return entropy, ranks


def centred(kernel: Tensor) -> Tensor:
    """HKH with H = I − 11ᵀ/n: the kernel of the features less their mean."""
    return kernel - kernel.mean(0, keepdim=True) - kernel.mean(1, keepdim=True) + kernel.mean()


def kernel_alignment(a: Tensor, b: Tensor) -> float:
    """tr(K₁K₂) / (‖K₁‖_F ‖K₂‖_F) for symmetric K₁, K₂ (n, n): 1 when one is a positive multiple of the other.

    Of `centred` kernels it is the centred alignment (Cortes et al. 2012), blind to the features' common mean, which
    dominates eNTK features and keeps the plain alignment near 1.
    """
    a, b = a.double(), b.double()
    return float((a * b).sum() / (a.norm() * b.norm()))


def predictor_kernel(test: Tensor, support: Tensor, ridge: float = 1e-6) -> Tensor:
    """The test×test kernel seen through a predictor's support: K_TS (K_SS + εI)⁻¹ K_ST, ε = ridge·tr(K_SS)/n.

    test (M, D), support (n, D). It is the kernel of the test features projected onto the span of the support's
    features; solved in the smaller of the n- and D-spaces (Φ_Sᵀ(Φ_SΦ_Sᵀ + εI)⁻¹Φ_S = (Φ_SᵀΦ_S + εI)⁻¹Φ_SᵀΦ_S).
    """
    test, support = test.double(), support.double()
    n, d = support.shape
    eps = ridge * support.square().sum() / n
    if n <= d:
        cross = support @ test.T
        gram = support @ support.T + eps * torch.eye(n, dtype=support.dtype, device=support.device)
        return cross.T @ torch.linalg.solve(gram, cross)
    covariance = support.T @ support
    system = covariance + eps * torch.eye(d, dtype=support.dtype, device=support.device)
    return test @ covariance @ torch.linalg.solve(system, test.T)


def nearest(support: Tensor, train: Tensor, k: int, rows: int = 1024) -> tuple[Tensor, Tensor]:
    """The k training points nearest each support point by cosine kernel: indices and values (m, k), best first.

    Computed `rows` support points at a time, so memory is rows × N.
    """
    k = min(k, len(train))
    unit_train = unit_rows(train)
    found = [(unit_rows(support[s : s + rows]) @ unit_train.T).topk(k, dim=1) for s in range(0, len(support), rows)]
    return torch.cat([f.indices for f in found]), torch.cat([f.values for f in found])
