"""Intervals over draws, and paired comparisons of two methods over the same draws (seeds/splits).

:func:`mean_interval`, the interval of a metric's mean over draws (a bounded metric: percentages in [0, 100]):
the two-sided t interval mean +/- t_{n-1, (1+level)/2} * sd / sqrt(n) from 3 draws on, when it stays inside
the metric's range; otherwise (2 draws, or a t interval crossing 0 or 100) the percentile bootstrap of the
mean over the draws (10,000 resamples, seed 0), which cannot leave the range. The result says which.

Paired comparisons, on the differences d_i = a_i - b_i:

* mean difference with a two-sided t interval, mean +/- t_{n-1, (1+level)/2} * sd / sqrt(n), from 3 draws
  on (2 draws give a t interval 12.7 standard errors wide: none is reported);
* Wilcoxon signed-rank test (scipy, two-sided; exact for small n without ties/zeros);
* paired permutation (sign-flip) test of the mean difference: exact over all 2^n sign patterns for
  n <= 16, else ``permutations`` seeded random patterns; the p-value counts patterns at least as extreme
  as the observed |mean|, the observed one included;
* ``resolved``: the t interval excludes 0;
* ``draws_to_resolve``: the smallest n at which a difference of the observed mean and spread would have a
  t interval excluding 0 (sd and mean held fixed; a planning figure, not a power calculation).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_DRAWS = 10_000
MIN_DRAWS_FOR_T = 3
BOUNDS = (0.0, 100.0)


def mean_interval(
    values: Sequence[float], *, level: float = 0.95, bounds: tuple[float, float] = BOUNDS
) -> dict[str, Any]:
    """Mean over draws with its interval: ``{"mean", "low", "high", "method"}`` (see the module docstring);
    ``method`` is 't', 'bootstrap' or None (one draw: no interval)."""
    from scipy.stats import t

    from promptvit.evaluation.bootstrap import bootstrap_ci

    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "method": None, "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "method": None, "n": n}
    if n >= MIN_DRAWS_FOR_T:
        half = float(t.ppf((1 + level) / 2, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
        if bounds[0] <= mean - half and mean + half <= bounds[1]:
            return {"mean": mean, "low": mean - half, "high": mean + half, "method": "t", "n": n}
    ci = bootstrap_ci(lambda idx: float(v[idx].mean()), n, resamples=10_000, level=level, seed=0)
    return {"mean": mean, "low": ci["low"], "high": ci["high"], "method": "bootstrap", "n": n}


def permutation_pvalue(differences: Sequence[float], *, permutations: int = 20_000, seed: int = 0) -> float:
    """Two-sided sign-flip p-value of the mean of ``differences``."""
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    observed = abs(d.mean())
    if n <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(permutations, n))
        signs[0] = 1.0
    means = np.abs(signs @ d) / n
    return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))


def draws_to_resolve(mean: float, sd: float, level: float = 0.95) -> int | None:
    """Smallest n >= 2 whose t interval mean +/- t * sd / sqrt(n) excludes 0; None above MAX_DRAWS or if mean = 0."""
    from scipy.stats import t

    if mean == 0 or not math.isfinite(mean):
        return None
    if sd == 0:
        return 2
    for n in range(2, MAX_DRAWS + 1):
        if t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n) < abs(mean):
            return n
    return None


def paired_comparison(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> dict[str, Any]:
    """Compare paired values ``a`` and ``b`` (same draws, same order); see the module docstring."""
    from scipy.stats import t, wilcoxon

    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} vs {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    out: dict[str, Any] = {"n": n, "mean": float(d.mean()) if n else None}
    if n < 2:
        return {
            **out,
            "sd": None,
            "low": None,
            "high": None,
            "wilcoxon_p": None,
            "permutation_p": None,
            "resolved": False,
            "draws_to_resolve": None,
        }
    sd = float(d.std(ddof=1))
    low = high = None
    if n >= MIN_DRAWS_FOR_T:
        half = float(t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
        low, high = out["mean"] - half, out["mean"] + half
    wilcoxon_p = 1.0 if not np.any(d) else float(wilcoxon(d).pvalue)
    return {
        **out,
        "sd": sd,
        "low": low,
        "high": high,
        "level": level,
        "wilcoxon_p": wilcoxon_p,
        "permutation_p": permutation_pvalue(d),
        "resolved": low is not None and bool(low > 0 or high < 0),
        "draws_to_resolve": draws_to_resolve(out["mean"], sd, level),
    }
