"""Data attribution through a kernel surrogate: which training points drive each prediction.

For a surrogate s_c(x) = Σ_j W_cj κ(x, x_j) + b_c over N training points,

    A_c(x, x_j) = W_cj κ(x, x_j) + b_c / N,    so that    Σ_j A_c(x, x_j) = s_c(x) exactly.

Proponents of a prediction are the training points with the largest A, opponents the smallest.
"""

from __future__ import annotations

from torch import Tensor


def attribution_scores(kernel: Tensor, W: Tensor, b: Tensor, classes: Tensor) -> Tensor:
    """A_{c_i}(x_i, x_j) (m, N) for kernel rows κ(x_i, ·) (m, N), W (C, N), b (C,), classes c_i (m,)."""
    return kernel * W[classes] + (b[classes] / kernel.shape[1])[:, None]


def all_class_scores(kernel: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """A_c(x_i, x_j) for every class: (m, N, C)."""
    return kernel[:, :, None] * W.T[None] + b / kernel.shape[1]


def extremes(scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k proponents (indices, scores, largest first) and opponents (smallest first) of each row."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1)
    bottom = scores.topk(k, dim=1, largest=False)
    return top.indices, top.values, bottom.indices, bottom.values
