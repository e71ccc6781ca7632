"""A probe head fitted to convergence: full-batch L-BFGS on cached features.

As the CLIP and DINOv2 linear evaluations do: the frozen backbone's pre-logit features are computed once,
then the head minimises::

    mean_i loss(W f_i + b, y_i) + lam / 2 * ||W||^2          (the bias is not penalised)

(softmax cross-entropy, or per-class sigmoid BCE summed over classes for multi-label) with full-batch L-BFGS
(strong Wolfe line search) in float64 until the gradient vanishes. This is scikit-learn's
``LogisticRegression`` with ``C = 1 / (lam * n)`` (a two-class softmax head: ``C = 2 / (lam * n)``, see
:func:`sklearn_l2`).

The L2 strength ``lam`` (docs/recipes.md, "The linear probe"):

* by default, **scikit-learn's C = 1**, i.e. ``lam = 1 / n_train`` (``2 / n_train`` for a two-class head): a
  strength that does not chase a tiny validation set. Chosen on validation instead only when the smallest
  class of the validation set (positives per class for multi-label) has at least
  :data:`MIN_VAL_PER_CLASS_TO_CHOOSE` images, from the default grid 1e-6 .. 1e2 (two per decade);
* an explicit ``l2_grid`` is always searched on validation (without a validation set: its middle value).

A search keeps the strength with the best validation metric (ties: the lower validation loss, then the
stronger L2), visiting strengths from strong to weak, each warm-started from the previous solution. An MLP
head (``mlp``) is fitted the same way from its initial weights (not convex: a local optimum). Features come
from the datasets as given; the run pipeline gives the probe its training images through the evaluation
transform, unaugmented, as CLIP and DINOv2 do (``Method.fits_head_to_convergence``).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from promptvit.cache import PrefixCache
from promptvit.errors import ConfigError, TrainingError
from promptvit.evaluation.probability import DEFAULT_BINS, scores_from_logits
from promptvit.train.losses import classification_loss
from promptvit.train.metrics import compute_metrics

#: the default L2 grid: 10^-6 .. 10^2, two points per decade
DEFAULT_L2_GRID = tuple(10.0 ** (e / 2) for e in range(-12, 5))
#: validation images in the smallest class (positives, multi-label) needed to choose the L2 strength on it
MIN_VAL_PER_CLASS_TO_CHOOSE = 50


@dataclasses.dataclass
class ProbeResult:
    l2: float
    val_metric: float | None
    val_metrics: dict[str, Any] | None
    #: (l2, val metric) for every grid point
    path: list[tuple[float, float | None]]
    #: how ``l2`` was set: fixed at scikit-learn's C = 1 (and why), or chosen on validation
    rule: str = ""


def sklearn_l2(n_train: int, num_classes: int, multilabel: bool, c: float = 1.0) -> float:
    """The L2 strength ``lam`` of our objective whose optimum is scikit-learn's ``LogisticRegression(C=c)``.

    scikit-learn minimises ``c * sum_i loss_i + ||w||^2 / 2``, i.e. ``mean_i loss_i + ||w||^2 / (2 c n)``:
    ``lam = 1 / (c n)`` for a softmax head over 3+ classes and for each class of a multi-label head (our
    multi-label loss sums the classes' BCE). A binary task is one weight vector w there; our two-column
    softmax head carries it as W_1 - W_0, whose penalty is smallest at W_1 = -W_0 = w / 2, where
    ``lam / 2 * (|W_0|^2 + |W_1|^2) = lam / 4 * |w|^2``: hence ``lam = 2 / (c n)``.
    """
    return (2.0 if not multilabel and num_classes == 2 else 1.0) / (c * n_train)


def _smallest_class(targets: torch.Tensor, num_classes: int, multilabel: bool) -> int:
    if multilabel:
        return int((targets >= 0.5).sum(dim=0).min())
    return int(torch.bincount(targets.long(), minlength=num_classes).min())


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    prefix_cache: PrefixCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features (float64, CPU) of a ``PromptModel`` in eval mode, and the stacked targets.

    The features are the model's own pre-logit pass (``forward_prefix`` at the last cut). With
    ``prefix_cache`` they are read from (and added to) that cache, the same batches computing the same values,
    so a probe on cached features equals one without.
    """
    depth = model.geometry.depth
    if prefix_cache is not None:
        features, targets = prefix_cache.prefix_outputs(
            model, dataset, depth, batch_size=batch_size, device=device
        )
        if targets is None:
            raise ConfigError(
                "the linear probe needs (image, label) items; this dataset yields images only: give it its labels"
            )
        return features.to("cpu", torch.float64), targets
    was_training = model.training
    model.eval()
    features, targets = [], []
    try:
        for images, target in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            features.append(model.forward_prefix(images.to(device), depth).to("cpu", torch.float64))
            targets.append(torch.as_tensor(target))
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(targets)


def fit_head(
    head: nn.Module,
    features: torch.Tensor,
    targets: torch.Tensor,
    l2: float,
    *,
    multilabel: bool = False,
    max_iter: int = 2000,
) -> None:
    """Fit every parameter of ``head`` (float64, in place) by full-batch L-BFGS from where it stands.

    Minimises the mean loss of ``head(features)`` + l2 / 2 * the squared norm of its weights (tensors of 2+
    dimensions; biases are not penalised). Convex for a single Linear layer; an MLP head reaches a local
    optimum from its current weights.
    """
    parameters = list(head.parameters())
    penalised = [p for p in parameters if p.ndim >= 2]
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        parameters,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        penalty = sum(p.pow(2).sum() for p in penalised)
        loss = classification_loss(head(features), targets, multilabel) + 0.5 * l2 * penalty
        loss.backward()
        return loss

    optimizer.step(closure)


def fit_logistic(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    multilabel: bool = False,
    max_iter: int = 2000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of the L2-regularised logistic regression on float64 ``features``, from zeros (convex)."""
    linear = nn.Linear(features.shape[1], num_classes, dtype=torch.float64)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    fit_head(linear, features, targets, l2, multilabel=multilabel, max_iter=max_iter)
    return linear.weight.detach(), linear.bias.detach()


def fit_lbfgs_probe(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    *,
    multilabel: bool,
    select: str,
    class_names: list[str],
    device: torch.device,
    batch_size: int = 64,
    l2_grid: tuple[float, ...] | list[float] | None = None,
    bins: int = DEFAULT_BINS,
    prefix_cache: PrefixCache | None = None,
) -> ProbeResult:
    """Fit the classifier head of ``model`` (linear, or an MLP head) in place; see the module docstring.
    ``prefix_cache`` supplies (and keeps) the pre-logit features, shared with other runs on the same backbone."""
    head = model.adapter_head()  # the active adapter's (an MLP head whole)
    if l2_grid is not None and (not l2_grid or min(l2_grid) <= 0):
        raise ConfigError(f"l2_grid must hold positive strengths, got {l2_grid}")
    features = {"batch_size": batch_size, "device": device, "prefix_cache": prefix_cache}
    train_x, train_y = extract_features(model, train_set, **features)
    val = extract_features(model, val_set, **features) if val_set is not None and len(val_set) else None
    if not bool(torch.isfinite(train_x).all()):
        raise TrainingError(
            "the linear probe's training features hold NaN/inf (check the images and transforms, e.g. "
            "unnormalised or corrupt inputs); nothing was fitted"
        )
    num_classes = len(class_names)
    smallest = None if val is None else _smallest_class(val[1], num_classes, multilabel)
    if l2_grid is not None:
        grid, rule = sorted(l2_grid, reverse=True), "chosen on val from the given l2_grid"
    elif smallest is not None and smallest >= MIN_VAL_PER_CLASS_TO_CHOOSE:
        grid, rule = sorted(DEFAULT_L2_GRID, reverse=True), "chosen on val from the default grid"
    else:
        grid = [sklearn_l2(len(train_y), num_classes, multilabel)]
        why = (
            "no validation set"
            if smallest is None
            else f"validation has {smallest} images in its smallest class, fewer than the "
            f"{MIN_VAL_PER_CLASS_TO_CHOOSE} needed to choose"
        )
        rule = f"fixed at scikit-learn's C = 1 ({why})"
    work = copy.deepcopy(head).to("cpu", torch.float64)
    # a 1x1-convolution head (DLA, DPN, BiT) reads the features as (N, C, 1, 1) maps
    on_maps = isinstance(work[0] if isinstance(work, nn.Sequential) else work, nn.Conv2d)
    fitted = nn.Sequential(work, nn.Flatten(1)) if on_maps else work
    if on_maps:
        train_x = train_x[:, :, None, None]
        val = None if val is None else (val[0][:, :, None, None], val[1])
    solutions, path = [], []
    for l2 in grid:  # strong to weak, each from the previous solution
        fit_head(fitted, train_x, train_y, l2, multilabel=multilabel)
        metrics = None
        if val is not None:
            with torch.no_grad():
                logits = fitted(val[0])
            scores = scores_from_logits(logits, multilabel)
            metrics = compute_metrics(scores, val[1], multilabel, class_names, bins=bins)
            metrics["loss"] = float(classification_loss(logits, val[1], multilabel))
        solutions.append((l2, copy.deepcopy(work.state_dict()), metrics))
        path.append((l2, None if metrics is None else metrics.get(select)))
    if val is None or len(solutions) == 1:
        chosen = solutions[len(solutions) // 2]
    else:
        # best metric; ties (a small val set gives many) go to the lower val loss, then to the stronger L2
        sign = -1.0 if select == "loss" else 1.0
        scored = [
            (sign * m[select], -m["loss"], -i)
            for i, (_, _, m) in enumerate(solutions)
            if m.get(select) is not None
        ]
        if not scored:
            raise ConfigError(f"val {select} could not be computed for any L2 strength")
        chosen = solutions[-max(scored)[2]]
    l2, state, metrics = chosen
    with torch.no_grad():
        for name, tensor in head.state_dict().items():
            tensor.copy_(state[name].to(tensor))
    return ProbeResult(
        l2=l2,
        val_metric=None if metrics is None else metrics.get(select),
        val_metrics=metrics,
        path=path,
        rule=rule,
    )
