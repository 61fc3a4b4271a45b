"""Faithfulness of a surrogate to the network it explains (SPEC §3): pure numpy functions."""

from __future__ import annotations

import math

import numpy as np

METRIC_NAMES = (
    "kendall_tau",
    "kendall_tau_dropped",
    "kendall_tau_true_class",
    "kendall_tau_true_class_dropped",
    "acc_nn",
    "acc_surrogate",
    "tad",
    "agreement",
    "miss_jaccard",
    "miss_jaccard_pvalue",
    "logit_r2",
    "logit_pearson",
    "n",
)


def _dense_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..r of the distinct values, ties sharing one rank."""
    return np.unique(values, return_inverse=True)[1].astype(np.int64) + 1


def _tied_pairs(ranks: np.ndarray) -> int:
    counts = np.bincount(ranks)
    return int((counts * (counts - 1) // 2).sum())


def _inversions(values: np.ndarray) -> int:
    """#{i < j : v_i > v_j} for non-negative integers, by a bottom-up merge sort, O(n log² n) in numpy."""
    n, values, total, width = len(values), values.copy(), 0, 1
    base = int(values.max()) + 1 if n else 1
    index = np.arange(n)
    while width < n:
        pair = index // (2 * width)
        right = (index % (2 * width)) >= width
        keys = pair * base + values
        left_keys = keys[~right]
        # left elements of the same pair that are ≤ each right element: a global search, minus earlier pairs
        at_most = np.searchsorted(left_keys, keys[right], side="right") - np.searchsorted(left_keys, pair[right] * base)
        left_sizes = np.bincount(pair[~right], minlength=pair[-1] + 1)
        total += int((left_sizes[pair[right]] - at_most).sum())
        values = np.sort(keys) - pair * base
        width *= 2
    return total


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's τ-b = (n_c − n_d) / √((n₀ − n_a)(n₀ − n_b)), n₀ = n(n−1)/2, n_a, n_b the pairs tied in a, b.

    Knight's method: order by (a, b), count discordant pairs as inversions of b; nan for n < 2 or a constant input.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    if n < 2:
        return float("nan")
    ra, rb = _dense_ranks(a), _dense_ranks(b)
    order = np.lexsort((rb, ra))
    ra, rb = ra[order], rb[order]
    pairs = n * (n - 1) // 2
    ties_a, ties_b = _tied_pairs(ra), _tied_pairs(rb)
    joint = _tied_pairs(np.unique(ra * (rb.max() + 1) + rb, return_inverse=True)[1])
    if ties_a == pairs or ties_b == pairs:
        return float("nan")
    discordant = _inversions(rb)
    concordant_minus_discordant = pairs - ties_a - ties_b + joint - 2 * discordant
    return concordant_minus_discordant / math.sqrt(pairs - ties_a) / math.sqrt(pairs - ties_b)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _tau_of_class(p_nn: np.ndarray, p_sur: np.ndarray, classes: np.ndarray) -> tuple[float, int]:
    """τ-b between the two models' probabilities of `classes`, dropping points where either is exactly 0 or 1."""
    rows = np.arange(len(classes))
    a, b = p_sur[rows, classes], p_nn[rows, classes]
    keep = (a > 0) & (a < 1) & (b > 0) & (b < 1)
    return kendall_tau_b(a[keep], b[keep]), int((~keep).sum())


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), summed in log space."""
    if k <= 0:
        return 1.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def logit_r2(nn_logits: np.ndarray, surrogate_logits: np.ndarray) -> float:
    """Pooled R² of the per-class affine fits nn_c ≈ a_c s_c + b_c: 1 − Σ_c SS_res,c / Σ_c SS_tot,c."""
    residual = total = 0.0
    for y, s in zip(nn_logits.T.astype(np.float64), surrogate_logits.T.astype(np.float64), strict=True):
        design = np.stack([s, np.ones_like(s)], axis=1)
        fit = design @ np.linalg.lstsq(design, y, rcond=None)[0]
        residual += float(((y - fit) ** 2).sum())
        total += float(((y - y.mean()) ** 2).sum())
    return 1.0 - residual / total if total > 0 else float("nan")


def faithfulness(nn_logits: np.ndarray, surrogate_logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Every metric of SPEC §3 for the network's and the surrogate's logits (M, C) on points with `labels`.

    kendall_tau: τ-b between the probabilities of the network's predicted class; tad = acc_surrogate − acc_nn;
    miss_jaccard = |Miss_NN ∩ Miss_sur| / |Miss_NN ∪ Miss_sur| (nan when neither misses) with the probability of
    at least as many joint misses if the two missed independently; logit_pearson over the flattened logits.
    """
    labels = np.asarray(labels)
    p_nn, p_sur = softmax(nn_logits), softmax(surrogate_logits)
    pred_nn, pred_sur = p_nn.argmax(1), p_sur.argmax(1)
    tau, dropped = _tau_of_class(p_nn, p_sur, pred_nn)
    tau_true, dropped_true = _tau_of_class(p_nn, p_sur, labels)
    miss_nn, miss_sur = pred_nn != labels, pred_sur != labels
    union = int((miss_nn | miss_sur).sum())
    both = int((miss_nn & miss_sur).sum())
    m = len(labels)
    acc_nn, acc_sur = float((~miss_nn).mean()), float((~miss_sur).mean())
    return {
        "kendall_tau": tau,
        "kendall_tau_dropped": dropped,
        "kendall_tau_true_class": tau_true,
        "kendall_tau_true_class_dropped": dropped_true,
        "acc_nn": acc_nn,
        "acc_surrogate": acc_sur,
        "tad": acc_sur - acc_nn,
        "agreement": float((pred_nn == pred_sur).mean()),
        "miss_jaccard": both / union if union else float("nan"),
        "miss_jaccard_pvalue": binomial_tail(both, m, float(miss_nn.mean() * miss_sur.mean())),
        "logit_r2": logit_r2(nn_logits, surrogate_logits),
        "logit_pearson": float(np.corrcoef(np.ravel(nn_logits), np.ravel(surrogate_logits))[0, 1]),
        "n": m,
    }
