"""Every faithfulness metric against an independent computation (scipy, sets, least squares, loops)."""

import numpy as np
import pytest
from scipy import stats

from ntk_explain.metrics import METRIC_NAMES, binomial_tail, faithfulness, kendall_tau_b, logit_r2, softmax


@pytest.mark.parametrize("n", [2, 3, 17, 500, 5000])
@pytest.mark.parametrize("ties", [False, True])
def test_kendall_tau_b_matches_scipy(n, ties):
    rng = np.random.default_rng(n)
    a = rng.integers(0, 6, n).astype(float) if ties else rng.normal(size=n)
    b = a + (rng.integers(0, 4, n) if ties else rng.normal(size=n))
    assert kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


def test_kendall_tau_b_by_hand():
    # pairs: (1,2) concordant, (1,3) concordant, (2,3) discordant → (2 − 1)/3
    assert kendall_tau_b(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(1 / 3)
    assert kendall_tau_b(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)
    assert np.isnan(kendall_tau_b(np.ones(4), np.arange(4.0)))
    assert np.isnan(kendall_tau_b(np.ones(1), np.ones(1)))


def test_binomial_tail_matches_scipy():
    for k, n, p in [(0, 10, 0.3), (3, 10, 0.3), (7, 359, 0.0004), (40, 1000, 0.02), (10, 10, 0.5)]:
        assert binomial_tail(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)


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
    assert logit_r2(y, y * 3 - 1) == pytest.approx(1.0)


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
    miss_nn = {i for i in range(m) if pred_nn[i] != labels[i]}
    miss_sur = {i for i in range(m) if pred_sur[i] != labels[i]}
    assert got["miss_jaccard"] == len(miss_nn & miss_sur) / len(miss_nn | miss_sur)
    p = len(miss_nn) / m * len(miss_sur) / m
    assert got["miss_jaccard_pvalue"] == pytest.approx(stats.binom.sf(len(miss_nn & miss_sur) - 1, m, p), rel=1e-9)
    rows = np.arange(m)
    tau = stats.kendalltau(p_sur[rows, nn.argmax(1)], p_nn[rows, nn.argmax(1)]).statistic
    assert got["kendall_tau"] == pytest.approx(tau, abs=1e-12) and got["kendall_tau_dropped"] == 0
    tau_true = stats.kendalltau(p_sur[rows, labels], p_nn[rows, labels]).statistic
    assert got["kendall_tau_true_class"] == pytest.approx(tau_true, abs=1e-12)
    assert got["logit_pearson"] == pytest.approx(np.corrcoef(nn.ravel(), sur.ravel())[0, 1])
    assert got["n"] == m


def test_saturated_probabilities_are_dropped_and_counted():
    rng = np.random.default_rng(3)
    nn = rng.normal(size=(30, 3))
    nn[:4, 0] += 800.0  # softmax is exactly 1.0 in float64 for these four points
    sur = nn + rng.normal(size=(30, 3)) * 0.1
    got = faithfulness(nn, sur, nn.argmax(1))
    assert got["kendall_tau_dropped"] == 4
    keep = np.arange(4, 30)
    p_nn, p_sur = softmax(nn)[keep], softmax(sur)[keep]
    pred = nn[keep].argmax(1)
    expected = stats.kendalltau(p_sur[np.arange(26), pred], p_nn[np.arange(26), pred]).statistic
    assert got["kendall_tau"] == pytest.approx(expected, abs=1e-12)


def test_identical_models_are_perfectly_faithful():
    rng = np.random.default_rng(4)
    nn = rng.normal(size=(40, 5))
    got = faithfulness(nn, nn.copy(), rng.integers(0, 5, 40))
    assert got["kendall_tau"] == pytest.approx(1.0) and got["agreement"] == 1.0
    assert got["logit_r2"] == pytest.approx(1.0) and got["tad"] == 0.0 and got["miss_jaccard"] == 1.0
