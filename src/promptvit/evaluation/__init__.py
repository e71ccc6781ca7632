"""Clinical-grade evaluation on arrays of probabilities: calibration metrics, temperature scaling,
decision thresholds and bootstrap confidence intervals (docs/clinical-evaluation.md).

This package sits below the engine: it knows tensors and arrays, never models, datasets or methods.
"""

from promptvit.evaluation.bootstrap import bootstrap_ci
from promptvit.evaluation.calibration import Calibration, fit_calibration
from promptvit.evaluation.probability import probability_metrics, reliability_bins
from promptvit.evaluation.thresholds import choose_thresholds, threshold_report

__all__ = [
    "Calibration",
    "bootstrap_ci",
    "choose_thresholds",
    "fit_calibration",
    "probability_metrics",
    "reliability_bins",
    "threshold_report",
]
