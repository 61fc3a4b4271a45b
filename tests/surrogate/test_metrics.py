"""Every faithfulness metric against an independent computation (scipy, sets, least squares, loops)."""

import itertools
import warnings

import numpy as np
import pytest
from scipy import stats

from ntk_explain.surrogate.metrics import (
    METRIC_NAMES,
    binomial_tail,
    faithfulness,
    kendall_tau_b,
    logit_r2,
    pearson,
    softmax,
)


@pytest.mark.parametrize("n", [2, 3, 17, 500, 5000, 100_000])
@pytest.mark.parametrize("ties", [False, True])
def test_kendall_tau_b_matches_scipy(n, ties):
    rng = np.random.default_rng(n)
    a = rng.integers(0, 6, n).astype(float) if ties else rng.normal(size=n)
    b = a + (rng.integers(0, 4, n) if ties else rng.normal(size=n))
    assert kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


def test_kendall_tau_b_matches_scipy_on_every_small_tie_pattern():
    rng = np.random.default_rng(0)
    for n, levels in itertools.product(range(2, 9), [2, 3, 40]):
        for _ in range(20):
            a, b = rng.integers(0, levels, n).astype(float), rng.integers(0, levels, n).astype(float)
            expected = stats.kendalltau(a, b).statistic
            got = kendall_tau_b(a, b)
            assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected, abs=1e-12), (a, b)


def test_kendall_tau_b_by_hand():
    # (0,1) (0,2) concordant, (1,2) discordant: (2 − 1) / 3
    assert kendall_tau_b(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(1 / 3)
    # pairs: (0,1) tied in a, (1,2) tied in b, the other 4 concordant: 4 / √((6 − 1)(6 − 1))
    assert kendall_tau_b(np.array([1.0, 1, 2, 3]), np.array([1.0, 2, 2, 3])) == pytest.approx(0.8)
    # (0,1) tied in both, (0,2) (1,2) discordant: −2 / √((3 − 1)(3 − 1))
    assert kendall_tau_b(np.array([1.0, 1, 2]), np.array([1.0, 1, 0])) == pytest.approx(-1.0)
    assert kendall_tau_b(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)
    assert np.isnan(kendall_tau_b(np.ones(4), np.arange(4.0)))
    assert np.isnan(kendall_tau_b(np.ones(1), np.ones(1)))
    assert np.isnan(kendall_tau_b(np.array([1.0, np.nan, 3.0]), np.arange(3.0)))


def test_binomial_tail_matches_scipy():
    cases = [(0, 10, 0.3), (3, 10, 0.3), (7, 359, 0.0004), (40, 1000, 0.02), (10, 10, 0.5), (130, 100_000, 0.001)]
    for k, n, p in cases:
        assert binomial_tail(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)
    assert binomial_tail(11, 10, 0.5) == 0.0 and binomial_tail(3, 10, 0.0) == 0.0 and binomial_tail(3, 10, 1.0) == 1.0


def test_logit_r2_is_the_pooled_per_class_least_squares_fit():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(50, 3))
    y = 2 * s + rng.normal(size=(50, 3)) * 0.5 + np.array([1.0, -2.0, 0.0])
    residual = total = 0.0
    for c in range(3):
        design = np.column_stack([s[:, c], np.ones(50)])
        coef, *_ = np.linalg.lstsq(design, y[:, c], rcond=None)
        residual += ((y[:, c] - design @ coef) ** 2).sum()
        total += ((y[:, c] - y[:, c].mean()) ** 2).sum()
    assert logit_r2(y, s) == pytest.approx(1 - residual / total, abs=1e-12)
    assert 0.5 < logit_r2(y, s) < 1.0
    assert logit_r2(y, y * 3 - 1) == pytest.approx(1.0)


def test_pearson_matches_corrcoef():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    y += x
    assert pearson(x, y) == pytest.approx(np.corrcoef(x.ravel(), y.ravel())[0, 1], abs=1e-12)
    assert pearson(x, -2 * x + 1) == pytest.approx(-1.0)


def test_faithfulness_against_loops_and_sets():
    rng = np.random.default_rng(2)
    m, c = 200, 4
    nn = rng.normal(size=(m, c)) * 3
    sur = nn + rng.normal(size=(m, c)) * 2
    labels = np.where(rng.random(m) < 0.8, nn.argmax(1), rng.integers(0, c, m))
    got = faithfulness(nn, sur, labels)
    assert tuple(got) == METRIC_NAMES
    p_nn, p_sur = softmax(nn), softmax(sur)
    pred_nn, pred_sur = [int(np.argmax(r)) for r in nn], [int(np.argmax(r)) for r in sur]
    assert got["acc_nn"] == sum(p == y for p, y in zip(pred_nn, labels, strict=True)) / m
    assert got["acc_surrogate"] == sum(p == y for p, y in zip(pred_sur, labels, strict=True)) / m
    assert got["tad"] == pytest.approx(got["acc_surrogate"] - got["acc_nn"])
    assert got["agreement"] == sum(a == b for a, b in zip(pred_nn, pred_sur, strict=True)) / m
    assert 0.5 < got["agreement"] < 1.0
    miss_nn = {i for i in range(m) if pred_nn[i] != labels[i]}
    miss_sur = {i for i in range(m) if pred_sur[i] != labels[i]}
    assert got["miss_jaccard"] == len(miss_nn & miss_sur) / len(miss_nn | miss_sur)
    p = len(miss_nn) / m * len(miss_sur) / m
    assert got["miss_jaccard_pvalue"] == pytest.approx(stats.binom.sf(len(miss_nn & miss_sur) - 1, m, p), rel=1e-9)
    assert got["miss_jaccard_pvalue"] < 0.05  # the surrogate shares the network's mistakes
    rows = np.arange(m)
    tau = stats.kendalltau(p_sur[rows, nn.argmax(1)], p_nn[rows, nn.argmax(1)]).statistic
    assert got["kendall_tau"] == pytest.approx(tau, abs=1e-12) and got["kendall_tau_dropped"] == 0
    tau_true = stats.kendalltau(p_sur[rows, labels], p_nn[rows, labels]).statistic
    assert got["kendall_tau_true_class"] == pytest.approx(tau_true, abs=1e-12)
    assert got["kendall_tau_true_class_dropped"] == 0
    assert got["logit_r2"] == pytest.approx(logit_r2(nn, sur))
    assert got["logit_pearson"] == pytest.approx(np.corrcoef(nn.ravel(), sur.ravel())[0, 1], abs=1e-12)
    assert got["n"] == m


def test_saturated_probabilities_are_dropped_and_counted():
    rng = np.random.default_rng(3)
    nn = rng.normal(size=(30, 3))
    nn[:4, 0] += 800.0  # softmax is exactly 1.0 for class 0 and exactly 0.0 for the others at these four points
    sur = nn + rng.normal(size=(30, 3)) * 0.1
    sur[4, 1] += 800.0  # only the surrogate saturates here
    labels = nn.argmax(1)
    labels[0], labels[5] = 1, (labels[5] + 1) % 3  # point 0: true-class probability exactly 0.0; point 5: not saturated
    p_nn, p_sur = softmax(nn), softmax(sur)
    assert (p_nn[:4, 0] == 1.0).all() and p_nn[0, 1] == 0.0 and p_sur[4, 1] == 1.0
    got = faithfulness(nn, sur, labels)
    keep = np.arange(5, 30)
    for key, classes, dropped in [("kendall_tau", nn.argmax(1), 5), ("kendall_tau_true_class", labels, 5)]:
        assert got[f"{key}_dropped"] == dropped
        expected = stats.kendalltau(p_sur[keep, classes[keep]], p_nn[keep, classes[keep]]).statistic
        assert got[key] == pytest.approx(expected, abs=1e-12)


def test_identical_models_are_perfectly_faithful():
    rng = np.random.default_rng(4)
    nn = rng.normal(size=(40, 5))
    got = faithfulness(nn, nn.copy(), rng.integers(0, 5, 40))
    assert got["kendall_tau"] == pytest.approx(1.0) and got["kendall_tau_true_class"] == pytest.approx(1.0)
    assert got["agreement"] == 1.0 and got["tad"] == 0.0 and got["miss_jaccard"] == 1.0
    assert got["logit_r2"] == pytest.approx(1.0) and got["logit_pearson"] == pytest.approx(1.0)


def test_degenerate_inputs_give_nan_silently():
    nn = np.zeros((6, 3))
    labels = np.zeros(6, dtype=int)  # argmax of a constant row is class 0: no misses
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = faithfulness(nn, nn.copy(), labels)
    for key in ["kendall_tau", "kendall_tau_true_class", "miss_jaccard", "logit_r2", "logit_pearson"]:
        assert np.isnan(got[key]), key
    assert got["miss_jaccard_pvalue"] == 1.0 and got["acc_nn"] == 1.0 and got["agreement"] == 1.0
