"""Empirical NTK variants as Grams of tangent features, computed tile by tile.

For samples x (rows) and x' (columns), with g_k the tangent features of `gradients`:

| kernel   | value                                   | block shape  |
|----------|-----------------------------------------|--------------|
| full     | Θ_cc'(x,x') = ⟨g_c(x), g_c'(x')⟩         | (n, m, C, C) |
| diagonal | K_c(x,x') = ⟨g_c(x), g_c(x')⟩            | (n, m, C)    |
| trace    | Σ_c ⟨g_c(x), g_c(x')⟩                    | (n, m)       |
| pseudo   | (1/C)⟨Σ_c g_c(x), Σ_c g_c(x')⟩            | (n, m)       |
| ck       | ⟨φ(x), φ(x')⟩, φ the penultimate layer   | (n, m)       |

Pseudo is the trace contraction of the K = 1 output Σ_c f_c/√C; ck is the trace contraction of
φ as a K = 1 feature. A factorised layer contributes Σ_{s,t} ⟨δ_ks, δ'_k't⟩⟨ã_s, ã'_t⟩, a lookup (embedding,
ã_s = e_{i_s}) Σ_{s,t} [i_s = i'_t] ⟨δ_ks, δ'_k't⟩; affine (normalisation) parameters are dense columns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ntk_explain.kernel.factors import Factors

_CLASS_AXES = {"trace": "", "diagonal": "k", "full": "kl"}


def contraction(kernel: str) -> str:
    """How the K output axes are combined: 'full', 'diagonal' or 'trace'."""
    return kernel if kernel in ("full", "diagonal") else "trace"


def kernel_output(kernel: str) -> str:
    """The output map of `gradients`: the scaled logit sum for pseudo, the logits otherwise."""
    return "pseudo" if kernel == "pseudo" else "logits"


def _indices(how: str, pairwise: bool) -> tuple[str, str, str]:
    """Einsum letters: the right sample, the right class, and the output axes."""
    right = "m" if pairwise else "n"
    return right, "l" if how == "full" else "k", ("nm" if pairwise else "n") + _CLASS_AXES[how]


def feature_gram(a: Tensor, b: Tensor | None, how: str) -> Tensor:
    """Inner products of features a (n, K, X) with b (m, K, X) → (n, m, …); b None: self (n, …). The trace Gram of
    a with itself (b is a) is `symmetric_gram` of a (n, K·X)."""
    if b is a and how == "trace":
        return symmetric_gram(a.flatten(1))
    right, right_class, out = _indices(how, b is not None)
    return torch.einsum(f"nkx,{right}{right_class}x->{out}", a, a if b is None else b)


def symmetric_gram(x: Tensor, leaf: int = 256) -> Tensor:
    """x xᵀ (n, n) for x (n, X): halves recursively down to `leaf` rows, computing the diagonal blocks and one
    off-diagonal block of each split and mirroring the other (5/8 of one product's flops at n = 4·leaf)."""
    n = x.shape[0]
    if n <= leaf:
        return x @ x.T
    half = n // 2
    out = x.new_empty((n, n))
    out[:half, :half] = symmetric_gram(x[:half], leaf)
    out[half:, half:] = symmetric_gram(x[half:], leaf)
    out[:half, half:] = x[:half] @ x[half:].T
    out[half:, :half] = out[:half, half:].T
    return out


def _site_gram(delta_a: Tensor, delta_b: Tensor | None, sites: Tensor, how: str) -> Tensor:
    """Σ_{s,t} ⟨δ_ks(x), δ_k't(x')⟩ A_st for δ (n, K, S, O), (m, K, T, O) and the sites' Gram A (n, m, S, T);
    b None: self, A (n, S, S)."""
    pairwise = delta_b is not None
    right, right_class, out = _indices(how, pairwise)
    rows = "nm" if pairwise else "n"
    deltas = torch.einsum(f"nkso,{right}{right_class}to->{out}st", delta_a, delta_b if pairwise else delta_a)
    return torch.einsum(f"{out}st,{rows}st->{out}", deltas, sites)


def factor_gram(delta_a: Tensor, in_a: Tensor, delta_b: Tensor | None, in_b: Tensor | None, how: str) -> Tensor:
    """Σ_{s,t} ⟨δ_ks(x), δ_k't(x')⟩ ⟨ã_s(x), ã_t(x')⟩ for δ (n, K, S, O), ã (n, S, I); b None: self."""
    if delta_b is None:
        return _site_gram(delta_a, None, torch.einsum("nsi,nti->nst", in_a, in_a), how)
    return _site_gram(delta_a, delta_b, torch.einsum("nsi,mti->nmst", in_a, in_b), how)


def lookup_gram(delta_a: Tensor, rows_a: Tensor, delta_b: Tensor | None, rows_b: Tensor | None, how: str) -> Tensor:
    """Σ_{s,t} [i_s(x) = i_t(x')] ⟨δ_ks(x), δ_k't(x')⟩ for δ (n, K, S, d) and rows i (n, S): the factor Gram of
    ã_s = e_{i_s} without one-hot vectors; b None: self."""
    if delta_b is None:
        return _site_gram(delta_a, None, (rows_a[:, :, None] == rows_a[:, None, :]).to(delta_a.dtype), how)
    same = rows_a[:, None, :, None] == rows_b[None, :, None, :]
    return _site_gram(delta_a, delta_b, same.to(delta_a.dtype), how)


def _structured(factors: Factors) -> list[tuple[Callable[..., Tensor], Tensor, Tensor]]:
    """(Gram function, δ, site inputs) of every factorised layer, then of every lookup."""
    layers = [(factor_gram, d, a) for d, a in zip(factors.deltas, factors.inputs, strict=True)]
    return layers + [(lookup_gram, d, i) for d, i in zip(factors.lookup_deltas, factors.indices, strict=True)]


def gram(a: Factors, b: Factors | None, how: str) -> Tensor:
    """Kernel block between the samples of `a` and `b` (b None: each sample with itself)."""
    total = feature_gram(a.dense, None if b is None else b.dense, how)
    others = [(None, None)] * len(a.deltas + a.lookup_deltas) if b is None else [s[1:] for s in _structured(b)]
    for (function, delta, sites), other in zip(_structured(a), others, strict=True):
        total = total + function(delta, sites, *other, how)
    return total


def mirror(block: Tensor) -> Tensor:
    """The block of (x', x) from that of (x, x'): swap the sample axes and the class axes."""
    return block.permute(1, 0, *reversed(range(2, block.dim())))
