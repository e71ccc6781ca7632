"""The clinical summary ``train`` and ``eval`` print: the main metric and AUC with their bootstrap CIs,
sensitivity/specificity/PPV/NPV at the stored threshold (binary and multi-label tasks), and the probability
metrics as trained (raw) and after the stored calibration.

Both verbs hand over their test metrics (``metrics.json``'s ``test``, or what ``evaluate_artifact``
returns); :func:`clinical_summary` reads either shape into one JSON-ready summary, :func:`print_clinical`
draws it. No torch here: the command line stays fast to start.
"""

from __future__ import annotations

import math
from typing import Any

from rich.markup import escape
from rich.table import Table

from promptvit.cli.output import console

_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "auc": "AUC",
    "map": "mAP",
    "map_present": "mAP (classes present)",
}
_PROBABILITY = (
    ("ece", "ECE % (equal-width)"),
    ("ece_mass", "ECE % (equal-mass)"),
    ("nll", "NLL"),
    ("brier", "Brier"),
)


def _number(value: Any) -> float | None:
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def _interval(metrics: dict[str, Any], key: str) -> dict[str, Any] | None:
    ci = metrics.get(key)
    if not isinstance(ci, dict) or _number(ci.get("low")) is None:
        return None
    return {k: ci.get(k) for k in ("low", "high", "level", "resamples", "units", "group_rule")}


def clinical_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """One shape for a training run's test metrics and ``eval``'s: see the module docstring."""
    main = (metrics.get("ci") or {}).get("metric") or ("map" if "map" in metrics else "accuracy")
    figures = [
        {"metric": main, "value": _number(metrics.get(main)), "ci": _interval(metrics, "ci")},
    ]
    if main != "auc" and "auc" in metrics:
        figures.append(
            {"metric": "auc", "value": _number(metrics.get("auc")), "ci": _interval(metrics, "auc_ci")}
        )
    for other in ("balanced_accuracy", "map_present"):
        if other != main and other in metrics:
            figures.append({"metric": other, "value": _number(metrics.get(other)), "ci": None})
    calibration = metrics.get("calibration") if isinstance(metrics.get("calibration"), dict) else None
    if isinstance(metrics.get("calibrated"), dict):  # a training run: raw at the top, calibrated beside
        raw, calibrated = metrics, metrics["calibrated"]
    elif metrics.get("calibrated") is True:  # eval with the stored calibration applied
        raw, calibrated = metrics.get("uncalibrated") or {}, metrics
    else:
        raw, calibrated = metrics, None
    applied = bool(calibration and calibration.get("applied", True)) and calibrated is not None
    thresholds = metrics.get("thresholds") if isinstance(metrics.get("thresholds"), dict) else None
    return {
        "num_samples": metrics.get("num_samples"),
        "figures": figures,
        "thresholds": thresholds,
        "calibration": {
            "applied": applied,
            "entry": calibration,
            "rows": [
                {
                    "metric": key,
                    "raw": _number(raw.get(key)),
                    "calibrated": _number(calibrated.get(key)) if applied and calibrated else None,
                }
                for key, _ in _PROBABILITY
                if key in raw
            ],
        },
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _calibration_text(summary: dict[str, Any]) -> str:
    entry = summary["calibration"]["entry"]
    if entry is None:
        return "no calibration stored (no validation split)"
    if not summary["calibration"]["applied"]:
        why = entry.get("reason") or "not applied"
        return f"not applied, probabilities kept uncalibrated: {why}"
    if entry.get("kind") == "temperature":
        text = f"temperature {entry.get('temperature', 1.0):.3g} fitted on validation"
    else:
        text = "per-class Platt scaling fitted on validation"
    return text + (f" ({entry['reason']})" if entry.get("reason") else "")


def print_clinical(metrics: dict[str, Any], title: str) -> dict[str, Any]:
    """Print the summary of ``metrics`` as three small tables; returns the summary."""
    summary = clinical_summary(metrics)
    level = next((f["ci"]["level"] for f in summary["figures"] if f["ci"]), None)
    ci_label = f"{level:.0%} CI" if level else "CI"
    units = next(
        (f["ci"].get("group_rule") or f["ci"].get("units") for f in summary["figures"] if f["ci"]), None
    )
    n = summary["num_samples"]
    table = Table(title=escape(f"{title}" + (f" (n = {n})" if n else "")), title_justify="left")
    for column in ("metric", "value %", f"{ci_label} (bootstrap percentile)"):
        table.add_column(column)
    for figure in summary["figures"]:
        ci = figure["ci"]
        table.add_row(
            _NAMES.get(figure["metric"], figure["metric"]),
            _fmt(figure["value"]),
            f"[{_fmt(ci['low'])}, {_fmt(ci['high'])}]" if ci else "—",
        )
    console.print(table)
    if units:
        console.print(escape(f"  CI resampling units: {units}"), style="dim", highlight=False)
    thresholds = summary["thresholds"]
    if thresholds and thresholds.get("classes"):
        rule = thresholds.get("rule") or "?"
        if rule == "sensitivity" and thresholds.get("target_sensitivity"):
            rule = f"sensitivity >= {thresholds['target_sensitivity']:g}"
        table = Table(
            title=escape(f"at the stored threshold (rule: {rule}, chosen on validation)"),
            title_justify="left",
        )
        for column in ("positive class", "threshold", "sensitivity %", "specificity %", "PPV %", "NPV %"):
            table.add_column(column)
        for name, row in thresholds["classes"].items():
            table.add_row(
                escape(str(name)),
                _fmt(_number(row.get("threshold")), 3),
                *(_fmt(_number(row.get(k))) for k in ("sensitivity", "specificity", "ppv", "npv")),
            )
        console.print(table)
    rows = summary["calibration"]["rows"]
    if rows:
        table = Table(title="probabilities: raw -> calibrated", title_justify="left")
        for column in ("metric", "raw", "calibrated"):
            table.add_column(column)
        labels = dict(_PROBABILITY)
        for row in rows:
            digits = 2 if row["metric"].startswith("ece") else 3
            table.add_row(labels[row["metric"]], _fmt(row["raw"], digits), _fmt(row["calibrated"], digits))
        console.print(table)
        console.print(escape(f"  calibration: {_calibration_text(summary)}"), highlight=False, soft_wrap=True)
    return summary
