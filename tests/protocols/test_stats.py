"""Paired comparisons: permutation and Wilcoxon p-values against scipy and exact hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from promptvit.protocols.stats import draws_to_resolve, paired_comparison, permutation_pvalue

A = [71.2, 68.4, 74.9, 70.1, 69.8, 73.3, 72.0, 66.5, 70.7, 71.9]
B = [69.0, 68.9, 71.2, 69.5, 67.1, 70.2, 71.4, 66.9, 68.8, 70.0]


def test_permutation_matches_scipy_exact() -> None:
    a, b = np.array(A), np.array(B)
    reference = stats.permutation_test(
        (a, b),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        n_resamples=np.inf,
        alternative="two-sided",
    )
    assert permutation_pvalue(a - b) == pytest.approx(reference.pvalue, abs=1e-12)


def test_permutation_monte_carlo_close_to_exact_for_many_draws() -> None:
    rng = np.random.default_rng(3)
    d = rng.normal(0.4, 1.0, size=20)
    reference = stats.permutation_test(
        (d,),
        np.mean,
        permutation_type="samples",
        n_resamples=200_000,
        alternative="two-sided",
        random_state=1,
    )
    assert permutation_pvalue(d, permutations=50_000) == pytest.approx(reference.pvalue, abs=0.01)


def test_wilcoxon_exact_by_hand_and_against_scipy() -> None:
    # six positive differences of distinct size: exact two-sided p = 2 / 2^6
    result = paired_comparison([3, 4, 5, 6, 7, 8], [2, 2, 2, 2, 2, 1])
    assert result["wilcoxon_p"] == pytest.approx(2 / 64)
    assert result["permutation_p"] == pytest.approx(2 / 64)
    full = paired_comparison(A, B)
    assert full["wilcoxon_p"] == pytest.approx(stats.wilcoxon(np.array(A) - np.array(B)).pvalue)


def test_t_interval_against_scipy_and_resolution() -> None:
    d = np.array(A) - np.array(B)
    result = paired_comparison(A, B)
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert result["low"] == pytest.approx(low) and result["high"] == pytest.approx(high)
    assert result["resolved"] == bool(low > 0 or high < 0)
    assert result["draws_to_resolve"] <= len(d)


def test_unresolved_difference_and_draws_needed() -> None:
    result = paired_comparison([1.0, -0.8, 0.9, -0.7, 0.5], [0.0] * 5)
    assert not result["resolved"]
    n = result["draws_to_resolve"]
    assert n > 5
    mean, sd = result["mean"], result["sd"]
    assert stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < abs(mean)
    assert stats.t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1) >= abs(mean)


def test_degenerate_inputs() -> None:
    same = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["mean"] == 0 and same["wilcoxon_p"] == 1.0 and same["permutation_p"] == 1.0
    assert not same["resolved"] and same["draws_to_resolve"] is None
    single = paired_comparison([1.0], [0.0])
    assert single["low"] is None and not single["resolved"]
    assert draws_to_resolve(1.0, 0.0) == 2
    with pytest.raises(ValueError, match="length"):
        paired_comparison([1.0, 2.0], [1.0])
