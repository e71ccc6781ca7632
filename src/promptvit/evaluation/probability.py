"""Are the predicted probabilities right? NLL, Brier score, ECE (equal-width and equal-mass bins) and MCE.

Single-label (``scores`` = softmax probabilities (N, C), ``targets`` = class indices):

* ``nll``: mean of -log p(true class) in nats (probabilities clamped at 1e-12, so one sample adds at most
  27.6; an evaluation that has logits reports the exact cross-entropy as ``loss`` beside it);
* ``brier``: mean over samples of sum over classes (p_c - [y = c])^2, between 0 and 2;
* ``ece``: top-label expected calibration error with ``bins`` equal-width bins of the confidence
  max_c p_c: sum over bins of (n_b / N) |accuracy_b - mean confidence_b|, in percent (torchmetrics'
  ``multiclass_calibration_error``; a sample falls in bin floor(confidence x bins), confidence 1 in the last);
* ``ece_mass``: the same with equal-mass bins: the samples sorted by confidence, cut into ``bins`` runs of
  equal size (sizes differ by at most one; tied confidences may straddle a cut), in percent;
* ``mce``: the largest |accuracy_b - confidence_b| over non-empty equal-width bins, in percent.

Multi-label (``scores`` = sigmoid probabilities, ``targets`` = multi-hot): each class is a binary problem
whose reliability is that of p(class present): ``per_class_ece`` / ``per_class_ece_mass`` /
``per_class_brier`` per class, ``ece``, ``ece_mass`` and ``brier`` their macro means over all classes,
``mce`` the largest per-class MCE, ``nll`` the mean binary cross-entropy over samples and classes.

NLL and Brier are on their natural scales (lower is better); ECE and MCE are percentages like the other
metrics. A degenerate input (one class present, all-equal scores) still gives finite values.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

DEFAULT_BINS = 15
PROBABILITY_METRICS = ("nll", "brier", "ece", "ece_mass", "mce")
_EPS = 1e-12


def scores_from_logits(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Class probabilities: softmax over classes, or a sigmoid per class for multi-label tasks."""
    return logits.sigmoid() if multilabel else logits.softmax(dim=-1)


def _top_label(scores: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    confidence, predicted = scores.max(dim=1)
    return confidence.numpy(), (predicted == targets).double().numpy()


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Equal-width reliability bins: per bin the sample count, mean confidence and accuracy (None if empty).

    ``confidence`` in [0, 1]; ``correct`` 0/1 (top-label: prediction right; binary: class present).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = torch.linspace(0, 1, bins + 1)  # the same edges and rule as torchmetrics
    index = (torch.bucketize(torch.as_tensor(confidence, dtype=torch.float32), edges, right=True) - 1).clamp(
        0, bins - 1
    )
    index = index.numpy()
    counts = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    acc_sum = np.bincount(index, weights=correct, minlength=bins)
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, counts, strict=True)],
        "accuracy": [float(s / c) if c else None for s, c in zip(acc_sum, counts, strict=True)],
    }


def equal_mass_ece(confidence: np.ndarray, correct: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """ECE (a fraction, not percent) over ``bins`` equal-size runs of the confidence-sorted samples."""
    order = np.argsort(np.asarray(confidence, dtype=np.float64), kind="stable")
    confidence, correct = (
        np.asarray(confidence, dtype=np.float64)[order],
        np.asarray(correct, np.float64)[order],
    )
    total = 0.0
    for chunk in np.array_split(np.arange(len(confidence)), min(bins, len(confidence))):
        total += len(chunk) * abs(correct[chunk].mean() - confidence[chunk].mean())
    return total / len(confidence)


def _binary_errors(p: torch.Tensor, y: torch.Tensor, bins: int) -> tuple[float, float, float]:
    from torchmetrics.functional.classification import binary_calibration_error

    ece = float(binary_calibration_error(p, y.long(), n_bins=bins, norm="l1"))
    mce = float(binary_calibration_error(p, y.long(), n_bins=bins, norm="max"))
    return ece, mce, equal_mass_ece(p.numpy(), y.double().numpy(), bins)


def probability_metrics(
    scores: torch.Tensor,
    targets: torch.Tensor,
    multilabel: bool,
    *,
    bins: int = DEFAULT_BINS,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """NLL, Brier, ECE (both binnings) and MCE of probabilities ``scores``; see the module docstring.

    ``class_names`` names the keys of the multi-label per-class dicts (default ``"0"``, ``"1"``...).
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    scores = scores.detach().to("cpu", torch.float64)
    targets = targets.detach().cpu()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torchmetrics")
        if multilabel:
            names = list(class_names) if class_names else [str(c) for c in range(scores.shape[1])]
            return _multilabel(scores, (targets >= 0.5).double(), bins, names)
        return _single_label(scores, targets.long(), bins)


def _single_label(scores: torch.Tensor, targets: torch.Tensor, bins: int) -> dict[str, Any]:
    from torchmetrics.functional.classification import multiclass_calibration_error

    num_classes = scores.shape[1]
    onehot = torch.nn.functional.one_hot(targets, num_classes).double()
    true_p = scores.gather(1, targets[:, None]).squeeze(1)
    # torchmetrics softmaxes inputs outside [0, 1]; probabilities are passed as they are
    preds = scores.float()
    ece = float(multiclass_calibration_error(preds, targets, num_classes, n_bins=bins, norm="l1"))
    mce = float(multiclass_calibration_error(preds, targets, num_classes, n_bins=bins, norm="max"))
    confidence, correct = _top_label(scores, targets)
    return {
        "nll": float(-true_p.clamp_min(_EPS).log().mean()),
        "brier": float(((scores - onehot) ** 2).sum(dim=1).mean()),
        "ece": 100.0 * ece,
        "ece_mass": 100.0 * equal_mass_ece(confidence, correct, bins),
        "mce": 100.0 * mce,
    }


def _multilabel(scores: torch.Tensor, positives: torch.Tensor, bins: int, names: list[str]) -> dict[str, Any]:
    per_ece, per_mass, per_mce, per_brier = [], [], [], []
    for c in range(scores.shape[1]):
        ece, mce, mass = _binary_errors(scores[:, c].float(), positives[:, c], bins)
        per_ece.append(100.0 * ece)
        per_mass.append(100.0 * mass)
        per_mce.append(100.0 * mce)
        per_brier.append(float(((scores[:, c] - positives[:, c]) ** 2).mean()))
    p = scores.clamp(_EPS, 1 - _EPS)
    bce = -(positives * p.log() + (1 - positives) * (1 - p).log())
    return {
        "nll": float(bce.mean()),
        "brier": float(np.mean(per_brier)),
        "ece": float(np.mean(per_ece)),
        "ece_mass": float(np.mean(per_mass)),
        "mce": float(np.max(per_mce)),
        "per_class_ece": dict(zip(names, per_ece, strict=True)),
        "per_class_ece_mass": dict(zip(names, per_mass, strict=True)),
        "per_class_brier": dict(zip(names, per_brier, strict=True)),
    }


def reliability_of(
    scores: torch.Tensor, targets: torch.Tensor, multilabel: bool, bins: int
) -> dict[str, Any]:
    """The bins a reliability diagram draws: top-label (single-label) or pooled over classes (multi-label)."""
    scores = scores.detach().to("cpu", torch.float64)
    if multilabel:
        return reliability_bins(scores.flatten().numpy(), (targets >= 0.5).double().flatten().numpy(), bins)
    confidence, correct = _top_label(scores, targets.long().cpu())
    return reliability_bins(confidence, correct, bins)
