"""Statistics against hand-computed values and textbook identities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mycelium.stats import (
    bootstrap_interval,
    mean_interval,
    partial_correlation,
    pearson_with_interval,
    spearman,
    wilson_interval,
)


def test_wilson_known_values():
    low, high = wilson_interval(9, 50, 0.95)
    assert low == pytest.approx(0.0977, abs=5e-4)
    assert high == pytest.approx(0.3080, abs=5e-4)
    # 0/10: lower end 0, upper z²/(n+z²).
    z2 = 1.959964**2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-6)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_wilson_edges():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(5, 3)
    with pytest.raises(ValueError):
        wilson_interval(1, 3, confidence=1.5)


def test_mean_interval_t_based():
    mean, low, high, n = mean_interval([1, 2, 3, 4, 5], 0.95)
    # sd = 1.5811, sem = 0.7071, t(0.975, 4) = 2.7764 -> half-width 1.9632
    assert (mean, n) == (3.0, 5)
    assert low == pytest.approx(1.0368, abs=1e-4)
    assert high == pytest.approx(4.9632, abs=1e-4)


def test_mean_interval_edges_drop_nan():
    assert mean_interval([2.0, float("nan"), 4.0]).n == 2
    single = mean_interval([7.0])
    assert single.mean == 7.0 and math.isnan(single.low) and single.n == 1
    empty = mean_interval([])
    assert empty.n == 0 and math.isnan(empty.mean)
    assert mean_interval([3, 3, 3]) == (3.0, 3.0, 3.0, 3)


def test_bootstrap_mean_close_to_normal_theory():
    values = np.random.default_rng(0).normal(10.0, 2.0, size=400)
    estimate, low, high, n = bootstrap_interval(values, np.mean, resamples=2000, confidence=0.95, seed=1)
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert n == 400 and estimate == pytest.approx(values.mean())
    assert low == pytest.approx(estimate - half_width, abs=0.05)
    assert high == pytest.approx(estimate + half_width, abs=0.05)


def test_bootstrap_is_reproducible_and_paired():
    rng = np.random.default_rng(3)
    a = rng.normal(size=50)
    b = a + 0.5 + rng.normal(scale=0.01, size=50)  # b - a is almost exactly 0.5 per unit

    def mean_difference(x, y):
        return float(np.mean(y - x))

    first = bootstrap_interval((a, b), mean_difference, resamples=500, confidence=0.95, seed=7)
    again = bootstrap_interval((a, b), mean_difference, resamples=500, confidence=0.95, seed=7)
    assert first == again
    # Pairing keeps units together: the interval is as narrow as the per-unit noise.
    assert first.high - first.low < 0.02
    assert first.low < 0.5 < first.high


def test_bootstrap_edges():
    assert bootstrap_interval([1.0, 1.0, 1.0], np.mean, 100, 0.95, 0)[1:3] == (1.0, 1.0)
    one = bootstrap_interval([4.0], np.mean, 100, 0.95, 0)
    assert one.estimate == 4.0 and math.isnan(one.low) and one.n == 1
    with pytest.raises(ValueError):
        bootstrap_interval(([1.0, 2.0], [1.0]), lambda x, y: 0.0, 100, 0.95, 0)


def test_pearson_fisher_interval_by_hand():
    result = pearson_with_interval([1, 2, 3, 4, 5], [2, 4, 5, 4, 5], 0.95)
    # r = 6 / sqrt(60); z = atanh(r) ± 1.96 / sqrt(n - 3)
    r = 6 / math.sqrt(60)
    half = 1.959964 / math.sqrt(2)
    assert result.estimate == pytest.approx(r)
    assert result.low == pytest.approx(math.tanh(math.atanh(r) - half), abs=1e-4)
    assert result.high == pytest.approx(math.tanh(math.atanh(r) + half), abs=1e-4)
    assert result.n == 5


def test_spearman_bonett_wright_interval_by_hand():
    result = spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], 0.95)
    # rho = 1 - 6·Σd²/(n(n²-1)) = 1 - 24/120 = 0.8; se = sqrt((1 + rho²/2)/(n-3))
    se = math.sqrt((1 + 0.32) / 2)
    assert result.estimate == pytest.approx(0.8)
    assert result.low == pytest.approx(math.tanh(math.atanh(0.8) - 1.959964 * se), abs=1e-4)
    assert result.high == pytest.approx(math.tanh(math.atanh(0.8) + 1.959964 * se), abs=1e-4)


def test_correlation_edges():
    assert math.isnan(pearson_with_interval([1, 2], [3, 4]).estimate)
    assert math.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4]).estimate)
    nan_pair = pearson_with_interval([1, 2, 3, 4, float("nan")], [1, 3, 2, 4, 5])
    assert nan_pair.n == 4


def test_partial_correlation_matches_the_three_correlation_formula():
    rng = np.random.default_rng(5)
    z = rng.normal(size=300)
    x = z + rng.normal(size=300)
    y = 0.5 * z + 0.3 * x + rng.normal(size=300)
    r_xy, r_xz, r_yz = (np.corrcoef(a, b)[0, 1] for a, b in ((x, y), (x, z), (y, z)))
    expected = (r_xy - r_xz * r_yz) / math.sqrt((1 - r_xz**2) * (1 - r_yz**2))
    result = partial_correlation(x, y, z, 0.95)
    assert result.estimate == pytest.approx(expected, abs=1e-10)
    assert result.n == 300
    half = 1.959964 / math.sqrt(300 - 3 - 1)
    assert result.low == pytest.approx(math.tanh(math.atanh(expected) - half), abs=1e-4)


def test_partial_correlation_removes_a_shared_cause():
    rng = np.random.default_rng(11)
    length = rng.normal(size=500)
    x = length + 0.3 * rng.normal(size=500)
    y = length + 0.3 * rng.normal(size=500)
    assert pearson_with_interval(x, y).estimate > 0.8
    controlled = partial_correlation(x, y, length)
    assert controlled.low < 0 < controlled.high
    assert controlled.p_value > 0.01
