"""A linear probe fitted to convergence: full-batch L-BFGS on cached features, L2 strength chosen on val.

As the CLIP and DINOv2 linear evaluations do: the frozen backbone's pre-logit features are computed once,
then for each L2 strength ``lam`` of a log grid the head minimises::

    mean_i loss(W f_i + b, y_i) + lam / 2 * ||W||^2          (the bias is not penalised)

(softmax cross-entropy, or per-class sigmoid BCE for multi-label) with full-batch L-BFGS (strong Wolfe line
search) in float64 until the gradient vanishes. This is scikit-learn's ``LogisticRegression`` with
``C = 1 / (lam * n)``. The strength with the best validation metric is kept (ties: the stronger L2); without
a validation set the middle of the grid is used. Strengths are visited from strong to weak, each warm-started
from the previous solution. Features come from the datasets as given: with random training augmentation they
are one random view per image.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from promptvit.methods.base import ConfigError
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


def fit_logistic(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    multilabel: bool = False,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 2000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising the mean loss + l2 / 2 ||W||^2 on float64 ``features`` by full-batch L-BFGS."""
    dim = features.shape[1]
    weight = torch.zeros(num_classes, dim, dtype=torch.float64) if init is None else init[0].clone()
    bias = torch.zeros(num_classes, dtype=torch.float64) if init is None else init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = features @ weight.T + bias
        loss = classification_loss(logits, targets, multilabel) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


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
) -> ProbeResult:
    """Fit the ``nn.Linear`` head of ``model`` (a linear probe) in place; see the module docstring."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"solver 'lbfgs' fits a single nn.Linear head; this model's head is {type(head).__name__}"
        )
    grid = sorted(l2_grid or DEFAULT_L2_GRID, reverse=True)
    if not grid or min(grid) <= 0:
        raise ConfigError(f"l2_grid must hold positive strengths, got {l2_grid}")
    train_x, train_y = extract_features(model, train_set, batch_size=batch_size, device=device)
    val = (
        extract_features(model, val_set, batch_size=batch_size, device=device)
        if val_set is not None
        else None
    )
    solutions, path = [], []
    init = None
    for l2 in grid:
        init = fit_logistic(train_x, train_y, head.out_features, l2, multilabel=multilabel, init=init)
        metrics = None
        if val is not None:
            logits = val[0] @ init[0].T + init[1]
            scores = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
            metrics = compute_metrics(scores, val[1], multilabel, class_names)
            metrics["loss"] = float(classification_loss(logits, val[1], multilabel))
        solutions.append((l2, init, metrics))
        path.append((l2, None if metrics is None else metrics.get(select)))
    if val is None:
        chosen = solutions[len(solutions) // 2]
    else:
        sign = -1.0 if select == "loss" else 1.0
        scored = [
            (sign * m[select], -i) for i, (_, _, m) in enumerate(solutions) if m.get(select) is not None
        ]
        if not scored:
            raise ConfigError(f"val {select} could not be computed for any L2 strength")
        chosen = solutions[-max(scored)[1]]
    l2, (weight, bias), metrics = chosen
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))
    return ProbeResult(
        l2=l2, val_metric=None if metrics is None else metrics.get(select), val_metrics=metrics, path=path
    )
