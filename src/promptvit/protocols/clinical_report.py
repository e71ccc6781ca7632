"""Report sections of the clinical evaluation (issue 18): per method the main metric with CIs, calibration
before/after temperature scaling, paired differences to the baseline, threshold metrics, reliability
diagrams. Read from the records' test metrics (``promptvit.train.clinical``); a record without them is
left out of these sections only.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from promptvit.methods import baseline_method
from promptvit.protocols.report_parts import (
    Table,
    metric_name,
    row_label,
    save_png,
    shots_label,
    slug,
    subplots,
)
from promptvit.protocols.stats import mean_interval, paired_comparison

LEVEL = 0.95


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "—" if value is None else (f"{value:.3f}" if value >= 0.001 else f"{value:.1e}")


def _ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") == "ok" and isinstance(r.get("score"), (int, float))]


def _mean_ci_text(values: list[float]) -> str:
    """``mean [low, high] (t|bootstrap)`` over draws (``stats.mean_interval``: stays within 0-100)."""
    found = mean_interval(values, level=LEVEL)
    if found["method"] is None:
        return _fmt(found["mean"]) + (" (one draw)" if values else "")
    return f"{_fmt(found['mean'])} [{_fmt(found['low'])}, {_fmt(found['high'])}] {found['method']}"


def _metric(record: dict[str, Any], *path: str) -> float | None:
    value: Any = record.get("metrics") or {}
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _cells(group: Any) -> dict[tuple, dict[str, list[dict[str, Any]]]]:
    """(task, shots) -> method -> ok records that carry the clinical metrics."""

    cells: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in _ok(group.records):
        if "calibrated" in (r.get("metrics") or {}):
            cells[(r["task"], r.get("shots"))][row_label(r)].append(r)
    return cells


def _stated(values: list[Any], fmt: str = "{}") -> str:
    """One setting as the records hold it: its value, or every value when the runs differ."""
    distinct = sorted({v for v in values if v is not None})
    return "/".join(fmt.format(v) for v in distinct) if distinct else "?"


def _evaluation_settings(records: list[dict[str, Any]]) -> dict[str, str]:
    """Bootstrap level and resamples and the number of ECE bins, read from the records (``evaluation:``)."""
    ci = [(r.get("metrics") or {}).get("ci") or {} for r in records]
    bins = [
        len(((r.get("metrics") or {}).get("reliability") or {}).get("counts") or []) or None for r in records
    ]
    return {
        "level": _stated([c.get("level") for c in ci], "{:.0%}"),
        "resamples": _stated([c.get("resamples") for c in ci]),
        "bins": _stated(bins),
    }


def _draw(record: dict[str, Any]) -> tuple:
    return (record.get("split"), record.get("seed"))


def clinical_tables(group: Any, reference: str | None = None) -> list[Any]:
    """Per (task, K): the calibration/CI table, the paired-difference table(s) and, for binary or
    multi-label tasks, the threshold table."""

    tables = []
    methods = group.methods
    for (task, shots), by_method in _cells(group).items():
        where = f"{group.protocol} — {group.backbone} — {task}{shots_label(shots)}"
        metric = metric_name(group.metric_of(task))
        rows = []
        for method in [m for m in methods if m in by_method]:
            records = by_method[method]
            mean_ci = _mean_ci_text([r["score"] for r in records])
            widths = [
                _metric(r, "ci", "high") - _metric(r, "ci", "low")
                for r in records
                if _metric(r, "ci", "low") is not None and _metric(r, "ci", "high") is not None
            ]
            temps = [_metric(r, "calibration", "temperature") for r in records]
            temps = [t for t in temps if t is not None]

            def avg(*path: str, records: list[dict[str, Any]] = records) -> float | None:
                values = [v for v in (_metric(r, *path) for r in records) if v is not None]
                return statistics.fmean(values) if values else None

            rows.append(
                [
                    method,
                    str(len(records)),
                    mean_ci,
                    _fmt(statistics.median(widths) if widths else None),
                    f"{_fmt(avg('ece'))} → {_fmt(avg('calibrated', 'ece'))}",
                    f"{_fmt(avg('ece_mass'))} → {_fmt(avg('calibrated', 'ece_mass'))}",
                    f"{_fmt(avg('nll'), 3)} → {_fmt(avg('calibrated', 'nll'), 3)}",
                    f"{_fmt(avg('brier'), 3)} → {_fmt(avg('calibrated', 'brier'), 3)}",
                    _fmt(statistics.median(temps) if temps else None),
                ]
            )
        group_rule = next(
            (
                r["metrics"]["ci"].get("group_rule")
                for rs in by_method.values()
                for r in rs
                if "ci" in r["metrics"]
            ),
            "images",
        )
        settings = _evaluation_settings([r for rs in by_method.values() for r in rs])
        tables.append(
            Table(
                title=f"{where}: test {metric} with 95% CIs, calibration before → after temperature scaling",
                columns=[
                    "method",
                    "draws",
                    f"{metric}: mean [95% CI over draws]",
                    f"per-run bootstrap {settings['level']} CI width (median)",
                    "ECE % (equal-width)",
                    "ECE % (equal-mass)",
                    "NLL",
                    "Brier",
                    "temperature (median)",
                ],
                rows=rows,
                notes=[
                    "CI over draws (variation over training draws and splits): 't' = mean ± t(n−1) × sd / √n "
                    "from 3 draws on when it stays within 0–100; 'bootstrap' = percentile bootstrap of the "
                    "mean over the draws (10,000 resamples), used for 2 draws or when the t interval would "
                    "leave 0–100",
                    f"per-run CI: percentile bootstrap over the test set ({settings['resamples']} resamples), "
                    f"units: {group_rule}; the median width over draws",
                    "calibration: fitted on each run's validation split only (single-label: one temperature; "
                    f"multi-label: per-class Platt); {settings['bins']} bins; left of → as trained, right after "
                    "calibration",
                ],
            )
        )
        for base in dict.fromkeys([baseline_method(), *([reference] if reference else [])]):
            if base in by_method:
                tables.append(_paired_table(where, metric, base, by_method, methods))
        threshold = _threshold_table(where, by_method, methods)
        if threshold is not None:
            tables.append(threshold)
    return tables


def _paired_table(
    where: str, metric: str, base: str, by_method: dict[str, list[dict[str, Any]]], methods: list[str]
) -> Any:

    reference = {_draw(r): r["score"] for r in by_method[base]}
    rows = []
    for method in [m for m in methods if m in by_method and m != base]:
        scores = {_draw(r): r["score"] for r in by_method[method]}
        shared = sorted(set(scores) & set(reference), key=str)
        result = paired_comparison([scores[d] for d in shared], [reference[d] for d in shared], level=LEVEL)
        needed = result["draws_to_resolve"]
        rows.append(
            [
                method,
                str(result["n"]),
                f"{_fmt(result['mean'])} [{_fmt(result['low'])}, {_fmt(result['high'])}]",
                _p(result["wilcoxon_p"]),
                _p(result["permutation_p"]),
                "yes" if result["resolved"] else "no",
                "—" if needed is None else (f"{needed}" if needed > result["n"] else f"≤ {result['n']}"),
            ]
        )
    return Table(
        title=f"{where}: paired difference of test {metric} to {base} (same draws)",
        columns=[
            "method",
            "paired draws",
            f"{metric} − {base}: mean [95% CI]",
            "Wilcoxon p",
            "permutation p",
            "resolved",
            "draws to resolve",
        ],
        rows=rows,
        notes=[
            "differences in percentage points, paired by (split, seed); CI: t interval over the paired "
            "differences, from 3 draws on (— with 2); resolved = the CI excludes 0",
            "Wilcoxon signed-rank (scipy, two-sided) and an exact sign-flip permutation test of the mean "
            "difference; each p-value and CI is for one comparison, not corrected for the number of methods",
            "draws to resolve: the smallest number of draws at which a difference of this mean and spread "
            "would have a CI excluding 0 (— : mean difference 0 or more than 10,000 draws)",
        ],
    )


def _threshold_table(where: str, by_method: dict[str, list[dict[str, Any]]], methods: list[str]) -> Any:

    rows = []
    for method in [m for m in methods if m in by_method]:
        per_class: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        rule = ""
        for r in by_method[method]:
            thresholds = r["metrics"].get("thresholds") or {}
            rule = thresholds.get("rule", rule)
            for name, entry in (thresholds.get("classes") or {}).items():
                for key in ("threshold", "sensitivity", "specificity", "ppv", "npv"):
                    if isinstance(entry.get(key), (int, float)):
                        per_class[name][key].append(float(entry[key]))
                for key, count in entry.get("confusion", {}).items():
                    per_class[name][key].append(float(count))
        for name, values in per_class.items():

            def m(key: str, values: dict[str, list[float]] = values) -> float | None:
                return statistics.fmean(values[key]) if values.get(key) else None

            rows.append(
                [
                    method,
                    name,
                    _fmt(m("threshold"), 3),
                    _fmt(m("sensitivity")),
                    _fmt(m("specificity")),
                    _fmt(m("ppv")),
                    _fmt(m("npv")),
                    f"{_fmt(m('tp'), 1)} / {_fmt(m('fp'), 1)} / {_fmt(m('fn'), 1)} / {_fmt(m('tn'), 1)}",
                ]
            )
    if not rows:
        return None
    return Table(
        title=f"{where}: test metrics at the decision threshold chosen on validation ({rule})",
        columns=[
            "method",
            "positive class",
            "threshold",
            "sensitivity %",
            "specificity %",
            "PPV %",
            "NPV %",
            "TP / FP / FN / TN",
        ],
        rows=rows,
        notes=[
            "means over draws; thresholds on calibrated probabilities, chosen on each run's validation split"
        ],
    )


def _pooled(records: list[dict[str, Any]], key: tuple[str, ...]) -> tuple[list[float], list[float], int]:
    counts: list[float] = []
    conf: list[float] = []
    acc: list[float] = []
    for r in records:
        bins: Any = r.get("metrics") or {}
        for k in key:
            bins = bins.get(k) if isinstance(bins, dict) else None
        if not bins:
            continue
        if counts and len(bins["counts"]) != len(counts):
            continue  # runs with another `evaluation.ece_bins` cannot share these bins
        if not counts:
            counts, conf, acc = (
                [0.0] * len(bins["counts"]),
                [0.0] * len(bins["counts"]),
                [0.0] * len(bins["counts"]),
            )
        for i, c in enumerate(bins["counts"]):
            if c:
                counts[i] += c
                conf[i] += c * bins["confidence"][i]
                acc[i] += c * bins["accuracy"][i]
    xs = [conf[i] / c for i, c in enumerate(counts) if c]
    ys = [acc[i] / c for i, c in enumerate(counts) if c]
    return xs, ys, int(sum(counts))


def reliability_plots(group: Any, out: Path) -> list[Path]:
    """One PNG per (task, K): a panel per method, test reliability pooled over draws, before/after calibration."""

    paths = []
    for (task, shots), by_method in _cells(group).items():
        methods = [m for m in group.methods if m in by_method]
        if not methods:
            continue
        import matplotlib.pyplot as plt

        fig, axes = subplots(len(methods))
        for ax, method in zip(axes, methods, strict=True):
            draw_reliability(ax, by_method[method], method)
        fig.suptitle(
            f"{group.protocol}, {group.backbone}, {task}{shots_label(shots)}: test reliability pooled over draws"
        )
        fig.tight_layout()
        stem = slug(f"{group.protocol}-{group.backbone}-{task}-{shots or 'all'}")
        paths.append(save_png(fig, out / f"{stem}-reliability.png"))
        plt.close(fig)
    return paths


def draw_reliability(ax: Any, records: list[dict[str, Any]], title: str) -> None:
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    for key, label in (
        (("reliability",), "as trained"),
        (("calibrated", "reliability"), "calibrated on val"),
    ):
        xs, ys, n = _pooled(records, key)
        if xs:
            ax.plot(xs, ys, marker="o", label=f"{label} (n={n})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
