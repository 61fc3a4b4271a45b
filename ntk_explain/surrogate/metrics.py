"""Faithfulness of a surrogate to the network it explains: rank agreement of their probabilities, accuracies and
agreement, the overlap of their misses, and the fit of their logits; pure numpy functions."""

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
    """Ranks 0..r−1 of the distinct values, ties sharing one rank."""
    return np.unique(values, return_inverse=True)[1].astype(np.int64).ravel()


def _tied_pairs(run_lengths: np.ndarray) -> int:
    """Σ_g t_g (t_g − 1) / 2: the pairs inside groups of tied values of sizes t_g."""
    return int((run_lengths * (run_lengths - 1) // 2).sum())


def _joint_run_lengths(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Lengths of the runs of consecutive equal pairs (a_i, b_i): the joint tie groups when sorted by (a, b)."""
    new_run = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
    return np.diff(np.r_[np.flatnonzero(new_run), len(a)])


def _inversions(values: np.ndarray) -> int:
    """#{i < j : v_i > v_j} for non-negative integers v, by a most-significant-bit-first binary radix sort.

    At bit β the sequence is stably sorted by v >> (β+1); inside each such group every (1-bit, later 0-bit) pair is
    an inversion, and a stable partition of the group by the bit sorts by v >> β. O(n log max v), with no comparisons.
    """
    v = np.asarray(values, dtype=np.int64)
    position = np.arange(len(v))
    total = 0
    for shift in reversed(range(int(v.max(initial=0)).bit_length())):
        high, bit = v >> (shift + 1), (v >> shift) & 1
        first = np.r_[True, high[1:] != high[:-1]]
        group, starts = np.cumsum(first) - 1, np.flatnonzero(first)
        ones_before = np.cumsum(bit) - bit
        ones_ahead = ones_before - ones_before[starts][group]  # 1-bits earlier in the same group
        total += int(ones_ahead[bit == 0].sum())
        zeros = np.add.reduceat(1 - bit, starts)[group]
        target = np.where(bit == 0, position - ones_ahead, starts[group] + zeros + ones_ahead)
        partitioned = np.empty_like(v)
        partitioned[target] = v
        v = partitioned
    return total


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's τ-b = (n_c − n_d) / √((n₀ − n_a)(n₀ − n_b)), n₀ = n(n−1)/2, n_a, n_b the pairs tied in a, in b.

    Knight's method, O(n log n): sort by (a, b); then n_d = the inversions of b, and
    n_c − n_d = n₀ − n_a − n_b + n_ab − 2 n_d with n_ab the pairs tied in both. nan for n < 2, a constant input or
    a nan anywhere (as scipy.stats.kendalltau).
    """
    a, b = np.ravel(np.asarray(a, dtype=np.float64)), np.ravel(np.asarray(b, dtype=np.float64))
    n = len(a)
    if n < 2 or np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    ra, rb = _dense_ranks(a), _dense_ranks(b)
    order = np.lexsort((rb, ra))
    ra, rb = ra[order], rb[order]
    pairs = n * (n - 1) // 2
    ties_a, ties_b = _tied_pairs(np.bincount(ra)), _tied_pairs(np.bincount(rb))
    if ties_a == pairs or ties_b == pairs:
        return float("nan")
    ties_ab = _tied_pairs(_joint_run_lengths(ra, rb))
    difference = pairs - ties_a - ties_b + ties_ab - 2 * _inversions(rb)
    return difference / math.sqrt(pairs - ties_a) / math.sqrt(pairs - ties_b)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax exp(z_c − max z) / Σ_c' exp(z_c' − max z), in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _tau_of_class(p_nn: np.ndarray, p_sur: np.ndarray, classes: np.ndarray) -> tuple[float, int]:
    """τ-b between the two models' probabilities of `classes`, and how many points were dropped for a 0 or 1."""
    rows = np.arange(len(classes))
    a, b = p_sur[rows, classes], p_nn[rows, classes]
    keep = (a > 0) & (a < 1) & (b > 0) & (b < 1)
    return kendall_tau_b(a[keep], b[keep]), int((~keep).sum())


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) = Σ_{i=k}^{n} C(n, i) pⁱ (1−p)ⁿ⁻ⁱ for X ~ Binomial(n, p), summed in log space.

    log C(n, k) by math.lgamma, later terms by the ratio C(n, i+1) / C(n, i) = (n − i) / (i + 1).
    """
    if k <= 0 or p >= 1:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    log_odds = math.log(p) - math.log1p(-p)
    first = (
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
    )
    i = np.arange(k, n, dtype=np.float64)
    log_terms = first + np.r_[0.0, np.cumsum(np.log((n - i) / (i + 1)) + log_odds)]
    top = log_terms.max()
    return min(1.0, math.exp(top) * float(np.exp(log_terms - top).sum()))


def logit_r2(nn_logits: np.ndarray, surrogate_logits: np.ndarray) -> float:
    """Pooled R² of the per-class least-squares fits nn_c ≈ a_c s_c + b_c: 1 − Σ_c SS_res,c / Σ_c SS_tot,c.

    nan when every network logit column is constant (Σ_c SS_tot,c = 0).
    """
    residual = total = 0.0
    for y, s in zip(np.asarray(nn_logits, np.float64).T, np.asarray(surrogate_logits, np.float64).T, strict=True):
        design = np.stack([s, np.ones_like(s)], axis=1)
        fit = design @ np.linalg.lstsq(design, y, rcond=None)[0]
        residual += float(((y - fit) ** 2).sum())
        total += float(((y - y.mean()) ** 2).sum())
    return 1.0 - residual / total if total > 0 else float("nan")


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r = Σ (x − x̄)(y − ȳ) / √(Σ (x − x̄)² Σ (y − ȳ)²) of the flattened inputs; nan if either is constant."""
    x, y = np.ravel(np.asarray(x, np.float64)), np.ravel(np.asarray(y, np.float64))
    x, y = x - x.mean(), y - y.mean()
    scale = math.sqrt(float(x @ x)) * math.sqrt(float(y @ y))
    return float(x @ y) / scale if scale > 0 else float("nan")


def faithfulness(nn_logits: np.ndarray, surrogate_logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Every metric (keys: METRIC_NAMES) for the network's and the surrogate's logits (M, C) on M points.

    kendall_tau(_true_class): τ-b between the surrogate's and the network's softmax probabilities of the network's
    predicted (the true) class, over the points where neither is exactly 0 or 1; the others are counted in
    kendall_tau(_true_class)_dropped. acc_* = mean(argmax = label); tad = acc_surrogate − acc_nn; agreement =
    mean(argmax_nn = argmax_surrogate). miss_jaccard = |Miss_NN ∩ Miss_sur| / |Miss_NN ∪ Miss_sur|, nan when neither
    model misses; miss_jaccard_pvalue = P(X ≥ |Miss_NN ∩ Miss_sur|), X ~ Binomial(M, p_NN p_sur) with p the miss
    rates: the chance of at least as many joint misses if the two missed independently. logit_r2: see logit_r2;
    logit_pearson: Pearson's r of the flattened logits. n = M.
    """
    nn_logits, surrogate_logits = np.asarray(nn_logits), np.asarray(surrogate_logits)
    labels = np.asarray(labels, dtype=np.int64)
    p_nn, p_sur = softmax(nn_logits), softmax(surrogate_logits)
    pred_nn, pred_sur = p_nn.argmax(1), p_sur.argmax(1)
    tau, dropped = _tau_of_class(p_nn, p_sur, pred_nn)
    tau_true, dropped_true = _tau_of_class(p_nn, p_sur, labels)
    miss_nn, miss_sur = pred_nn != labels, pred_sur != labels
    union, both = int((miss_nn | miss_sur).sum()), int((miss_nn & miss_sur).sum())
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
        "logit_pearson": pearson(nn_logits, surrogate_logits),
        "n": m,
    }
