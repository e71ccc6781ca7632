"""After training: calibrate on validation, choose decision thresholds on validation, then test once with
probability metrics, threshold metrics and a bootstrap CI of the main metric (docs/clinical-evaluation.md).

``test_with_calibration`` is the one hook both run pipelines call in place of ``evaluate`` on the test
set. It returns ``evaluate``'s metrics of the model as trained (the main metric and its ranking metrics
are those of the uncalibrated model; single-label temperature scaling cannot change accuracy), plus:

* ``reliability``: the equal-width bins of the uncalibrated test probabilities;
* ``calibration``: the calibration fitted on validation (also written to the artifact);
* ``calibrated``: NLL, Brier, ECE, ECE (equal mass), MCE and reliability bins of the calibrated test
  probabilities;
* ``thresholds`` (binary and multi-label tasks): per class, the threshold chosen on calibrated validation
  probabilities (also in the artifact) and test sensitivity, specificity, PPV, NPV and confusion counts;
* ``ci``: the percentile bootstrap 95 % CI of the main metric, resampling images or, where the data has
  groups (``promptvit.data.spec.sample_groups``), whole groups.

The test set is never used to fit anything: calibration and thresholds see validation logits only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from promptvit.artifact import update_artifact_config
from promptvit.cache import PrefixCache
from promptvit.evaluation import (
    bootstrap_ci,
    choose_thresholds,
    fit_calibration,
    probability_metrics,
    threshold_report,
)
from promptvit.evaluation.calibration import artifact_calibration
from promptvit.evaluation.probability import DEFAULT_BINS, reliability_of, scores_from_logits
from promptvit.evaluation.thresholds import applies
from promptvit.model import PromptModel
from promptvit.train.config import EvaluationConfig
from promptvit.train.engine import predict_logits
from promptvit.train.losses import check_targets, classification_loss
from promptvit.train.metrics import compute_metrics

logger = logging.getLogger(__name__)


def fast_statistic(
    metric: str, scores: torch.Tensor, targets: torch.Tensor, multilabel: bool
) -> Callable[[np.ndarray], float | None]:
    """``indices -> metric`` in percent: vectorised for accuracy/balanced accuracy, else compute_metrics."""
    if not multilabel and metric in ("accuracy", "balanced_accuracy"):
        truth = targets.long().numpy()
        correct = scores.argmax(dim=1).numpy() == truth
        if metric == "accuracy":
            return lambda idx: 100.0 * float(correct[idx].mean())

        def balanced(idx: np.ndarray) -> float:
            t, ok = truth[idx], correct[idx]
            return 100.0 * float(np.mean([ok[t == c].mean() for c in np.unique(t)]))

        return balanced

    def generic(idx: np.ndarray) -> float | None:
        index = torch.as_tensor(idx)
        return compute_metrics(scores[index], targets[index], multilabel, bins=None).get(metric)

    return generic


def fast_auc(
    scores: torch.Tensor, targets: torch.Tensor, multilabel: bool
) -> Callable[[np.ndarray], float | None]:
    """``indices -> macro ROC-AUC`` in percent, as ``compute_metrics`` defines it (one-vs-rest over the classes
    with positives and negatives among the indices), from ranks (Mann-Whitney, ties counted half): fast
    enough for a bootstrap of a multi-label test set."""
    from scipy.stats import rankdata

    values = scores.detach().to("cpu", torch.float64).numpy()
    if multilabel:
        positives = (targets.detach().cpu() >= 0.5).numpy()
    else:
        positives = np.eye(values.shape[1], dtype=bool)[targets.detach().cpu().long().numpy()]

    def auc(idx: np.ndarray) -> float | None:
        s, y = values[idx], positives[idx]
        found = []
        for c in range(s.shape[1]):
            n_pos = int(y[:, c].sum())
            n_neg = len(idx) - n_pos
            if n_pos and n_neg:
                ranks = rankdata(s[:, c])
                found.append((ranks[y[:, c]].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        return 100.0 * float(np.mean(found)) if found else None

    return auc


def confidence_intervals(
    scores: torch.Tensor,
    targets: torch.Tensor,
    multilabel: bool,
    metrics: dict[str, Any],
    main_metric: str,
    *,
    groups: list[str] | None,
    group_rule: str,
    resamples: int,
    level: float,
) -> dict[str, Any]:
    """``ci`` (the main metric) and ``auc_ci``: percentile bootstrap intervals over the test images (or their
    groups), seed 0. Only for metrics the test set defines."""
    out: dict[str, Any] = {}
    wanted = [("ci", main_metric)]
    if main_metric != "auc":
        wanted.append(("auc_ci", "auc"))
    for key, metric in wanted:
        if metrics.get(metric) is None or metric == "loss":
            continue
        statistic = (
            fast_auc(scores, targets, multilabel)
            if metric == "auc"
            else fast_statistic(metric, scores, targets, multilabel)
        )
        ci = bootstrap_ci(statistic, len(targets), groups=groups, resamples=resamples, level=level, seed=0)
        out[key] = {"metric": metric, "group_rule": group_rule, **ci}
    return out


def test_with_calibration(
    model: PromptModel,
    test_set: Dataset,
    val_set: Dataset | None,
    *,
    multilabel: bool,
    class_names: list[str],
    main_metric: str,
    batch_size: int = 64,
    artifact_dir: str | Path | None = None,
    groups: list[str] | None = None,
    group_rule: str = "images",
    options: EvaluationConfig | None = None,
    prefix_cache: PrefixCache | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Fit calibration and thresholds on ``val_set``, store them in ``artifact_dir``, test once."""
    options = options or EvaluationConfig()
    forward = {"batch_size": batch_size, "prefix_cache": prefix_cache, "precision": precision}
    logits, targets = predict_logits(model, test_set, **forward)
    if targets is None:
        raise ValueError("testing needs (image, target) items")
    check_targets(targets, logits.shape[1], multilabel)
    scores = scores_from_logits(logits, multilabel)
    metrics = compute_metrics(scores, targets, multilabel, class_names, bins=options.ece_bins)
    metrics["loss"] = float(classification_loss(logits, targets, multilabel))
    metrics["reliability"] = reliability_of(scores, targets, multilabel, options.ece_bins)
    if val_set is not None and len(val_set):
        val_logits, val_targets = predict_logits(model, val_set, **forward)
        calibration = fit_calibration(
            val_logits,
            val_targets,
            multilabel,
            checked=options.calibration == "checked",
            min_per_class=options.calibration_min_per_class,
        )
        if calibration.reason:
            what = "calibration not applied" if not calibration.applied else "calibration partly applied"
            logger.warning(
                "%s: %s; the test probabilities are %s (evaluation.calibration: always applies the fit anyway)",
                what,
                calibration.reason,
                "uncalibrated" if not calibration.applied else "calibrated for the other classes",
            )
        calibrated = calibration.probabilities(logits.double())
        metrics["calibration"] = calibration.to_dict()
        metrics["calibrated"] = {
            **probability_metrics(
                calibrated, targets, multilabel, bins=options.ece_bins, class_names=class_names
            ),
            "reliability": reliability_of(calibrated, targets, multilabel, options.ece_bins),
        }
        stored: dict[str, Any] = {"calibration": calibration.to_dict()}
        if applies(len(class_names), multilabel):
            thresholds = choose_thresholds(
                calibration.probabilities(val_logits.double()),
                val_targets,
                multilabel,
                class_names,
                rule=options.threshold_rule,
                target_sensitivity=options.target_sensitivity,
            )
            stored["thresholds"] = thresholds
            metrics["thresholds"] = {
                "rule": thresholds["rule"],
                "classes": threshold_report(calibrated, targets, multilabel, thresholds),
            }
        if artifact_dir is not None:
            update_artifact_config(artifact_dir, **stored)
    metrics.update(
        confidence_intervals(
            scores,
            targets,
            multilabel,
            metrics,
            main_metric,
            groups=groups,
            group_rule=group_rule,
            resamples=options.bootstrap_resamples,
            level=options.ci_level,
        )
    )
    return metrics


def artifact_probabilities(
    logits: torch.Tensor, info: dict[str, Any], where: str | Path, *, calibrated: bool = True
) -> torch.Tensor:
    """Probabilities of an artifact's logits: calibrated with its stored calibration unless ``calibrated``
    is False or it has none."""
    calibration = artifact_calibration(info, where) if calibrated else None
    if calibration is None:
        return scores_from_logits(logits, info["multilabel"])
    return calibration.probabilities(logits)


def thresholds_apply(info: dict[str, Any], calibrated: bool) -> bool:
    """Whether the stored thresholds fit the probabilities: they were chosen on the validation probabilities
    as calibrated by the stored calibration, or on the raw ones where it was not applied."""
    stored = info.get("calibration")
    chosen_on_calibrated = stored is not None and stored.get("applied", True)
    return bool(info.get("thresholds")) and (calibrated or not chosen_on_calibrated)


def evaluate_artifact(
    model: PromptModel,
    dataset: Dataset,
    info: dict[str, Any],
    where: str | Path,
    *,
    calibrated: bool = True,
    batch_size: int = 64,
    bins: int = DEFAULT_BINS,
    main_metric: str | None = None,
    groups: list[str] | None = None,
    group_rule: str = "images (no group ids in this data)",
    options: EvaluationConfig | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """``evaluate`` for a saved artifact: probabilities calibrated as stored (unless ``calibrated=False``, or
    where the run kept them uncalibrated), the uncalibrated probability metrics beside them, metrics at the
    stored decision thresholds, and bootstrap CIs of ``main_metric`` (default accuracy / mAP) and AUC."""
    options = options or EvaluationConfig()
    multilabel, names = info["multilabel"], info["class_names"]
    logits, targets = predict_logits(model, dataset, batch_size=batch_size, progress=progress)
    if targets is None:
        raise ValueError("evaluation needs (image, target) items")
    check_targets(targets, logits.shape[1], multilabel)
    raw = scores_from_logits(logits, multilabel)
    calibration = artifact_calibration(info, where) if calibrated else None
    applied = calibration is not None and calibration.applied
    scores = calibration.probabilities(logits.double()) if applied else raw  # type: ignore[union-attr]
    metrics = compute_metrics(scores, targets, multilabel, names, bins=bins)
    metrics["loss"] = float(classification_loss(logits, targets, multilabel))
    metrics["calibrated"] = applied
    if calibration is not None:
        metrics["calibration"] = calibration.to_dict()
    if applied:
        metrics["uncalibrated"] = probability_metrics(raw, targets, multilabel, bins=bins, class_names=names)
    if thresholds_apply(info, applied):
        metrics["thresholds"] = {
            "rule": info["thresholds"].get("rule"),
            "target_sensitivity": info["thresholds"].get("target_sensitivity"),
            "classes": threshold_report(scores, targets, multilabel, info["thresholds"]),
        }
    metrics.update(
        confidence_intervals(
            scores,
            targets,
            multilabel,
            metrics,
            main_metric or ("map" if multilabel else "accuracy"),
            groups=groups,
            group_rule=group_rule,
            resamples=options.bootstrap_resamples,
            level=options.ci_level,
        )
    )
    return metrics


def predicted_labels(scores: torch.Tensor, info: dict[str, Any], *, calibrated: bool = True) -> list[str]:
    """Each row's decision: the stored thresholds (binary: on the positive class; multi-label: per class)
    when they fit the probabilities (:func:`thresholds_apply`); else argmax / >= 0.5."""
    names = info["class_names"]
    stored = (info.get("thresholds") or {}).get("classes") if thresholds_apply(info, calibrated) else None
    if info["multilabel"]:
        cut = [float((stored or {}).get(n, {}).get("threshold", 0.5)) for n in names]
        return [
            ";".join(n for n, p, t in zip(names, row, cut, strict=True) if p >= t) for row in scores.tolist()
        ]
    if stored and len(names) == 2 and names[1] in stored:
        threshold = float(stored[names[1]]["threshold"])
        return [names[1] if row[1] >= threshold else names[0] for row in scores.tolist()]
    return [names[int(i)] for i in scores.argmax(dim=1)]
