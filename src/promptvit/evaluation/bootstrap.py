"""Percentile bootstrap confidence intervals for a test-set metric, with group-level resampling.

Each of ``resamples`` replicates draws as many units as the test set has, with replacement, and
recomputes the metric; the interval is the (alpha/2, 1 - alpha/2) quantiles of the replicates (replicates
where the metric is undefined, e.g. AUC with one class drawn, are dropped and counted). A unit is an image,
or, where the data has groups (images of one patient, study or lesion), a whole group: its images enter a
replicate together, so correlated images do not narrow the interval. ``promptvit.train.clinical``
documents which groups each data source has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _units(n: int, groups: Sequence[Any] | None) -> list[np.ndarray]:
    if groups is None:
        return [np.array([i]) for i in range(n)]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group ids for {n} samples")
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return [np.array(m) for m in members.values()]


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float | None],
    n: int,
    *,
    groups: Sequence[Any] | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile interval of ``statistic(indices)`` over bootstrap resamples of ``n`` samples (or groups)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    units = _units(n, groups)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(units), size=(resamples, len(units)))
    values = []
    for row in draws:
        value = statistic(np.concatenate([units[u] for u in row]) if groups is not None else row)
        if value is not None and np.isfinite(value):
            values.append(value)
    alpha = 1 - level
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2]) if values else (None, None)
    return {
        "low": None if low is None else float(low),
        "high": None if high is None else float(high),
        "level": level,
        "resamples": resamples,
        "undefined_resamples": resamples - len(values),
        "units": "groups" if groups is not None else "images",
        "num_units": len(units),
        "seed": seed,
    }
