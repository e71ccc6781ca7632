"""Classification metrics, MedFMC conventions (docs/protocols-and-recipes.md, "MedFMC metrics").

**Every metric is a percentage (0-100)**, as MedFMC and the EPT paper report them; a metric that cannot be
computed (e.g. AUC when no class has both positives and negatives) is ``None``, never NaN.

Single-label (``scores`` = softmax probabilities, ``targets`` = class indices):

* ``accuracy``: top-1 accuracy;
* ``balanced_accuracy``: mean recall over the classes present in ``targets`` (scikit-learn's
  ``balanced_accuracy_score``);
* ``auc``: macro one-vs-rest ROC-AUC: per class, scikit-learn-style ROC-AUC of that class's probability,
  averaged over the classes that have both positives and negatives (others listed in ``auc_skipped``);
  MedFMC's ``AUC_multiclass``;
* ``per_class_recall``, ``per_class_auc``: ``{class name: value or None}``.

Multi-label (``scores`` = sigmoid probabilities, ``targets`` = multi-hot; an entry >= 0.5 is positive):

* ``map``: mmcls/MedFMC mAP: per class, AP = mean of precision@rank over the ranks of its positives (ties
  grouped as in scikit-learn's ``average_precision_score``; identical to mmcls without ties); **a class
  with no positives has AP 0**, and the mean runs over **all** classes. This is the published metric;
  Endo's test set has a class without positives, which caps its mAP at 75;
* ``map_present``: the same mean over the classes with at least one positive;
* ``auc``: macro ROC-AUC over the classes with both positives and negatives (others in ``auc_skipped``;
  MedFMC's code repeats the previous class's value for such a class, a bug not copied here);
* ``per_class_ap``, ``per_class_auc``: ``{class name: value or None}``.

Both also report ``num_samples`` and the probability metrics of
:mod:`promptvit.evaluation.probability` (``nll``, ``brier``, ``ece``, ``ece_mass``, ``mce``; multi-label
also per-class ECE/Brier): NLL and Brier on their own scales, ECE/MCE in percent, all lower-is-better. AUC and AP come from torchmetrics, which works in float32: they agree
with scikit-learn to about 1e-5 percentage points.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from promptvit.evaluation.probability import DEFAULT_BINS, probability_metrics

#: metrics a run may be selected on (all higher-is-better percentages), plus ``loss`` (lower is better)
SINGLE_LABEL_SELECTABLE = ("accuracy", "balanced_accuracy", "auc", "loss")
MULTI_LABEL_SELECTABLE = ("map", "map_present", "auc", "loss")
LOWER_IS_BETTER = frozenset({"loss"})


def selectable_metrics(multilabel: bool) -> tuple[str, ...]:
    return MULTI_LABEL_SELECTABLE if multilabel else SINGLE_LABEL_SELECTABLE


def _pct(value: torch.Tensor | float) -> float:
    return float(value) * 100.0


def _binary_auc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    from torchmetrics.functional.classification import binary_auroc

    return _pct(binary_auroc(scores, positives.long()))


def _binary_ap(scores: torch.Tensor, positives: torch.Tensor) -> float:
    from torchmetrics.functional.classification import binary_average_precision

    return _pct(binary_average_precision(scores, positives.long()))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _per_class_auc(
    scores: torch.Tensor, positives: torch.Tensor, names: list[str]
) -> tuple[dict[str, float | None], list[str]]:
    n = scores.shape[0]
    aucs: dict[str, float | None] = {}
    skipped = []
    for c, name in enumerate(names):
        count = int(positives[:, c].sum())
        if 0 < count < n:
            aucs[name] = _binary_auc(scores[:, c], positives[:, c])
        else:
            aucs[name] = None
            skipped.append(name)
    return aucs, skipped


def compute_metrics(
    scores: torch.Tensor,
    targets: torch.Tensor,
    multilabel: bool,
    class_names: list[str] | None = None,
    *,
    bins: int | None = DEFAULT_BINS,
) -> dict[str, Any]:
    """Metrics of ``scores`` (N, C) probabilities against ``targets``; see the module docstring.

    ``class_names`` names the keys of the per-class dicts (default ``"0"``, ``"1"``...). ``bins``: the
    ECE/MCE bins; None leaves the probability metrics out.
    """
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty (N, C) matrix, got shape {tuple(scores.shape)}")
    n, num_classes = scores.shape
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} score columns")
    if targets.shape[0] != n:
        raise ValueError(f"{targets.shape[0]} targets for {n} score rows")
    scores = scores.detach().to("cpu", torch.float64)
    targets = targets.detach().cpu()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torchmetrics")
        metrics = (
            _multilabel_metrics(scores, targets, names)
            if multilabel
            else _single_label_metrics(scores, targets, names)
        )
    if bins is not None:
        metrics.update(probability_metrics(scores, targets, multilabel, bins=bins, class_names=names))
    return metrics


def _single_label_metrics(scores: torch.Tensor, targets: torch.Tensor, names: list[str]) -> dict[str, Any]:
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    num_classes = scores.shape[1]
    if targets.ndim != 1 or targets.is_floating_point():
        raise ValueError(
            f"single-label targets must be class indices, got {targets.dtype} {tuple(targets.shape)}"
        )
    confusion = multiclass_confusion_matrix(scores, targets.long(), num_classes=num_classes).double()
    support = confusion.sum(dim=1)
    recalls = {
        name: _pct(confusion[c, c] / support[c]) if support[c] > 0 else None for c, name in enumerate(names)
    }
    positives = torch.nn.functional.one_hot(targets.long(), num_classes).bool()
    aucs, skipped = _per_class_auc(scores, positives, names)
    return {
        "accuracy": _pct(confusion.diagonal().sum() / confusion.sum()),
        "balanced_accuracy": _mean([r for r in recalls.values() if r is not None]),
        "auc": _mean([a for a in aucs.values() if a is not None]),
        "auc_skipped": skipped,
        "per_class_recall": recalls,
        "per_class_auc": aucs,
        "num_samples": int(targets.shape[0]),
    }


def _multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor, names: list[str]) -> dict[str, Any]:
    if targets.shape != scores.shape:
        raise ValueError(
            f"multi-label targets must have the scores' shape {tuple(scores.shape)}, got {tuple(targets.shape)}"
        )
    positives = targets >= 0.5
    aps: dict[str, float] = {}
    present = []
    for c, name in enumerate(names):
        if positives[:, c].any():
            aps[name] = _binary_ap(scores[:, c], positives[:, c])
            present.append(aps[name])
        else:
            aps[name] = 0.0  # mmcls: a class without positives contributes AP 0
    aucs, skipped = _per_class_auc(scores, positives, names)
    return {
        "map": _mean(list(aps.values())),
        "map_present": _mean(present),
        "auc": _mean([a for a in aucs.values() if a is not None]),
        "auc_skipped": skipped,
        "per_class_ap": aps,
        "per_class_auc": aucs,
        "num_samples": int(targets.shape[0]),
    }
