"""Cosine normalisation K(x,x')/sqrt(K(x,x) K(x',x')), applied on read and never stored: of kernel blocks from their
self-kernels, and of features (rows scaled to unit self-kernel)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ntk_explain.errors import BadInputError


def _inv_sqrt(diag: np.ndarray) -> np.ndarray:
    """1/sqrt(d) elementwise, 0 where d <= 0 (a zero self-kernel leaves its entries 0, not NaN)."""
    out = np.zeros(diag.shape, dtype=np.result_type(diag.dtype, np.float32))
    positive = diag > 0
    out[positive] = 1.0 / np.sqrt(diag[positive])
    return out


def _class_diag(diag: np.ndarray, kernel_ndim: int) -> np.ndarray:
    """Per-class self-kernels (n, C) from a stored diagonal; 'full' stores (n, C, C) self blocks."""
    if kernel_ndim == 4 and diag.ndim == 3:
        return np.einsum("ncc->nc", diag)
    return diag


def cosine_normalize(kernel: np.ndarray, diag_rows: np.ndarray, diag_cols: np.ndarray) -> np.ndarray:
    """Cosine-normalise a kernel block given the self-kernels of its row and column points.

    Shapes: (N,M) with diags (N,), (M,); 'diagonal' (N,M,C) with (N,C), (M,C); 'full' (N,M,C,C)
    with (N,C,C), (M,C,C) self blocks (or their (N,C) diagonals): Θ_cc'(x,x')/sqrt(Θ_cc(x,x) Θ_c'c'(x',x')).
    """
    r = _inv_sqrt(_class_diag(np.asarray(diag_rows), kernel.ndim))
    c = _inv_sqrt(_class_diag(np.asarray(diag_cols), kernel.ndim))
    classes = kernel.shape[2:3]
    if kernel.ndim not in (2, 3, 4) or r.shape != kernel.shape[:1] + classes or c.shape != kernel.shape[1:2] + classes:
        raise BadInputError(f"kernel of shape {kernel.shape} does not match self-kernel shapes {r.shape}, {c.shape}")
    if kernel.ndim == 2:
        scale = r[:, None] * c[None, :]
    elif kernel.ndim == 3:
        scale = r[:, None, :] * c[None, :, :]
    else:
        scale = r[:, None, :, None] * c[None, :, None, :]
    return (kernel * scale).astype(np.result_type(kernel.dtype, np.float32), copy=False)


def cosine_features(features: Tensor, diag: Tensor) -> Tensor:
    """Features φ (n, D) scaled by 1/sqrt(K(x, x)) from the stored self-kernels `diag` (n,), 0 where it is 0: the
    features of the cosine-normalised kernel as the stored kernel has it."""
    return features * torch.where(diag > 0, diag.clamp_min(1e-300).rsqrt(), 0.0)[:, None]


def unit_rows(features: Tensor) -> Tensor:
    """Rows scaled to unit norm (zero rows stay zero): the features of the cosine-normalised kernel."""
    return F.normalize(features, dim=1)
