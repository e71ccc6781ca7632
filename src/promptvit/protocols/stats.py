"""Paired comparisons of two methods over the same draws (seeds/splits): the differences d_i = a_i - b_i.

* mean difference with a two-sided t interval, mean +/- t_{n-1, (1+level)/2} * sd / sqrt(n);
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
        "resolved": bool(low > 0 or high < 0),
        "draws_to_resolve": draws_to_resolve(out["mean"], sd, level),
    }
