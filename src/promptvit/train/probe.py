"""A probe head fitted to convergence: full-batch L-BFGS on cached features, L2 strength chosen on val.

As the CLIP and DINOv2 linear evaluations do: the frozen backbone's pre-logit features are computed once,
then for each L2 strength ``lam`` of a log grid the head minimises::

    mean_i loss(W f_i + b, y_i) + lam / 2 * ||W||^2          (the bias is not penalised)

(softmax cross-entropy, or per-class sigmoid BCE for multi-label) with full-batch L-BFGS (strong Wolfe line
search) in float64 until the gradient vanishes. This is scikit-learn's ``LogisticRegression`` with
``C = 1 / (lam * n)``. The strength with the best validation metric is kept (ties: the lower validation loss,
then the stronger L2); without a validation set the middle of the grid is used. Strengths are visited from
strong to weak, each warm-started from the previous solution. An MLP head (``mlp``) is fitted the same way
from its initial weights (not convex: a local optimum). Features come from the datasets as given; the run
pipeline gives the probe its training images through the evaluation transform, unaugmented, as CLIP and
DINOv2 do (``Method.fits_head_to_convergence``).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from promptvit.backbones import classifier_name
from promptvit.errors import ConfigError
from promptvit.evaluation.probability import DEFAULT_BINS, scores_from_logits
from promptvit.train.losses import classification_loss
from promptvit.train.metrics import compute_metrics

#: the default L2 grid: 10^-6 .. 10^2, two points per decade
DEFAULT_L2_GRID = tuple(10.0 ** (e / 2) for e in range(-12, 5))


@dataclasses.dataclass
class ProbeResult:
    l2: float
    val_metric: float | None
    val_metrics: dict[str, Any] | None
    #: (l2, val metric) for every grid point
    path: list[tuple[float, float | None]]


@torch.no_grad()
def extract_features(
    model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features (float64, CPU) of a ``PromptModel`` in eval mode, and the stacked targets."""
    was_training = model.training
    model.eval()
    features, targets = [], []
    try:
        for images, target in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            pre = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
            features.append(pre.to("cpu", torch.float64))
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
) -> ProbeResult:
    """Fit the classifier head of ``model`` (linear, or an MLP head) in place; see the module docstring."""
    head = model.backbone.get_submodule(classifier_name(model.backbone))
    grid = sorted(l2_grid or DEFAULT_L2_GRID, reverse=True)
    if not grid or min(grid) <= 0:
        raise ConfigError(f"l2_grid must hold positive strengths, got {l2_grid}")
    train_x, train_y = extract_features(model, train_set, batch_size=batch_size, device=device)
    val = (
        extract_features(model, val_set, batch_size=batch_size, device=device)
        if val_set is not None
        else None
    )
    work = copy.deepcopy(head).to("cpu", torch.float64)
    solutions, path = [], []
    for l2 in grid:  # strong to weak, each from the previous solution
        fit_head(work, train_x, train_y, l2, multilabel=multilabel)
        metrics = None
        if val is not None:
            with torch.no_grad():
                logits = work(val[0])
            scores = scores_from_logits(logits, multilabel)
            metrics = compute_metrics(scores, val[1], multilabel, class_names, bins=bins)
            metrics["loss"] = float(classification_loss(logits, val[1], multilabel))
        solutions.append((l2, copy.deepcopy(work.state_dict()), metrics))
        path.append((l2, None if metrics is None else metrics.get(select)))
    if val is None:
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
        l2=l2, val_metric=None if metrics is None else metrics.get(select), val_metrics=metrics, path=path
    )
