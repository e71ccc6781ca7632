"""Decision thresholds for binary and multi-label tasks, chosen on validation, reported on test.

A binary single-label task (two classes) thresholds p(class 1), class 1 being the positive class (the
second of ``class_names``; for PneumoniaMNIST: pneumonia); a multi-label task thresholds each class's
probability. An image is called positive when its probability is >= the threshold. Rules:

* ``youden``: the candidate maximising Youden's J = sensitivity + specificity - 1 on validation (ties: the
  highest such threshold);
* ``sensitivity``: the highest candidate whose validation sensitivity is >= ``target_sensitivity``.

Candidates are the validation probabilities themselves. Where validation lacks positives or negatives for
a class, nothing can be chosen and the threshold is 0.5 (``rule`` then says so). Test reports sensitivity,
specificity, PPV and NPV (percentages; None where a denominator is 0) and the confusion counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

RULES = ("youden", "sensitivity")


def _choose(p: np.ndarray, y: np.ndarray, rule: str, target: float) -> tuple[float, str]:
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    if positives == 0 or negatives == 0:
        return 0.5, "0.5 (validation lacks positives or negatives)"
    candidates = np.unique(p)[::-1]  # highest first: ties resolve to the highest threshold
    called = p[None, :] >= candidates[:, None]
    sensitivity = (called & (y[None, :] == 1)).sum(axis=1) / positives
    specificity = (~called & (y[None, :] == 0)).sum(axis=1) / negatives
    if rule == "youden":
        return float(candidates[int(np.argmax(sensitivity + specificity - 1))]), "youden"
    reaching = np.flatnonzero(sensitivity >= target)
    return float(candidates[int(reaching[0])]), f"sensitivity >= {target:g}"


def _binary_columns(
    scores: torch.Tensor, targets: torch.Tensor, multilabel: bool
) -> tuple[np.ndarray, np.ndarray]:
    scores = scores.detach().to("cpu", torch.float64)
    if multilabel:
        return scores.numpy(), (targets.detach().cpu() >= 0.5).double().numpy()
    if scores.shape[1] != 2:
        raise ValueError(f"thresholds apply to binary or multi-label tasks, not {scores.shape[1]} classes")
    return scores[:, 1:].numpy(), (targets.detach().cpu().long() == 1).double().numpy()[:, None]


def applies(num_classes: int, multilabel: bool) -> bool:
    return multilabel or num_classes == 2


def choose_thresholds(
    scores: torch.Tensor,
    targets: torch.Tensor,
    multilabel: bool,
    class_names: list[str],
    *,
    rule: str = "youden",
    target_sensitivity: float = 0.9,
) -> dict[str, Any]:
    """Thresholds from validation ``scores`` (probabilities); what the artifact stores as ``thresholds``."""
    if rule not in RULES:
        raise ValueError(f"threshold rule must be one of {list(RULES)}, got {rule!r}")
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    p, y = _binary_columns(scores, targets, multilabel)
    names = list(class_names) if multilabel else [class_names[1]]
    chosen = {}
    for c, name in enumerate(names):
        value, how = _choose(p[:, c], y[:, c], rule, target_sensitivity)
        chosen[name] = {"threshold": value, "rule": how}
    return {
        "rule": rule,
        "target_sensitivity": target_sensitivity if rule == "sensitivity" else None,
        "chosen_on": "val",
        "classes": chosen,
    }


def _pct(num: int, den: int) -> float | None:
    return 100.0 * num / den if den else None


def threshold_report(
    scores: torch.Tensor, targets: torch.Tensor, multilabel: bool, thresholds: dict[str, Any]
) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV and the confusion matrix at each stored threshold."""
    p, y = _binary_columns(scores, targets, multilabel)
    out = {}
    for c, (name, entry) in enumerate(thresholds["classes"].items()):
        called, truth = p[:, c] >= entry["threshold"], y[:, c] == 1
        tp, fp = int((called & truth).sum()), int((called & ~truth).sum())
        fn, tn = int((~called & truth).sum()), int((~called & ~truth).sum())
        out[name] = {
            "threshold": entry["threshold"],
            "sensitivity": _pct(tp, tp + fn),
            "specificity": _pct(tn, tn + fp),
            "ppv": _pct(tp, tp + fp),
            "npv": _pct(tn, tn + fn),
            "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        }
    return out
