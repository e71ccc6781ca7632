"""Optimiser with per-group weight decay, and a warm-up + cosine schedule stepped per optimiser update."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from promptvit.errors import ConfigError
from promptvit.train.config import TrainConfig

#: modules whose parameters are normalisation parameters (exempt from weight decay unless decay_all)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES = (*NORM_TYPES, nn.RMSNorm)


def _timm_no_weight_decay(model: nn.Module) -> set[str]:
    """Full names of the parameters timm lists in ``no_weight_decay()`` (pos_embed, cls_token...)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            try:
                listed = hook()
            except TypeError:
                continue
            names.update(f"{prefix}.{n}" if prefix else n for n in listed)
    return names


def is_decay_exempt(name: str, parameter: torch.Tensor, norm_ids: set[int], timm_exempt: set[str]) -> bool:
    """The no-decay rule: biases, 1-D tensors, norm parameters, prompts and timm's exemptions."""
    return (
        parameter.ndim <= 1
        or name.endswith("bias")
        or "prompt" in name.lower()
        or id(parameter) in norm_ids
        or name in timm_exempt
    )


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Parameter groups of the tuned parameters: "decay" and "no_decay" (empty groups left out).

    Each group carries a ``group`` entry with its name; torch keeps extra keys in param groups.
    """
    if hasattr(model, "tuned_named_parameters"):
        named = list(model.tuned_named_parameters())
    else:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no tuned parameters (nothing has requires_grad=True)")
    if cfg.decay_all:
        return [{"params": [p for _, p in named], "weight_decay": cfg.weight_decay, "group": "decay"}]
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)
    }
    timm_exempt = _timm_no_weight_decay(model)
    decay, no_decay = [], []
    for name, parameter in named:
        exempt = is_decay_exempt(name, parameter, norm_ids, timm_exempt)
        (no_decay if exempt else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum ``cfg.momentum``) or AdamW over the tuned parameters, at the peak lr."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.peak_lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.peak_lr)


class WarmupCosine:
    """lr multiplier for update ``step`` (0-based): linear warm-up from 0, then cosine to ``min_ratio``.

    ``factor(s) = s / W`` for ``s < W``; then ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` with
    ``p = (s - W) / (T - W)`` clamped to 1, so the factor is 1 at ``s = W`` and ``min_ratio`` at ``s = T``
    (after the last of the T updates). A plain callable object, so ``LambdaLR.state_dict`` saves its fields.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        if span <= 0:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Number of optimiser updates in the run: ``max_steps`` if set, else epochs x steps per epoch."""
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


def num_epochs(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Epochs the run has (with ``max_steps`` the last one may be partial)."""
    return math.ceil(total_steps(cfg, steps_per_epoch) / steps_per_epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Warm-up (``cfg.warmup_epochs``, from lr 0) then cosine to ``cfg.min_lr``; call ``step()`` per update.

    Resumable: ``state_dict()`` holds the step count and the schedule's fields (all JSON-serialisable).
    """
    if steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    peak = cfg.peak_lr
    if cfg.min_lr > peak:
        raise ConfigError(f"min_lr ({cfg.min_lr}) exceeds the peak lr ({peak} after scale_lr)")
    total = total_steps(cfg, steps_per_epoch)
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    return LambdaLR(optimizer, WarmupCosine(warmup, total, cfg.min_lr / peak))
