"""Optimiser with per-group weight decay, and a warm-up + cosine schedule stepped per optimiser update."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from promptvit.backbones import NORM_LAYERS
from promptvit.errors import ConfigError
from promptvit.train.config import TrainConfig


def _timm_no_weight_decay(model: nn.Module) -> set[int]:
    """ids of the parameters timm's ``no_weight_decay()`` hooks list (pos_embed, cls_token...), by identity:
    a wrapped model names its tensors otherwise than the module that lists them."""
    ids: set[int] = set()
    for module in model.modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            try:
                listed = hook()
            except TypeError:
                continue
            own = dict(module.named_parameters())
            ids.update(id(own[name]) for name in listed if name in own)
    return ids


def is_decay_exempt(name: str, parameter: torch.Tensor, norm_ids: set[int], timm_exempt: set[int]) -> bool:
    """The standard no-decay rule: biases, 1-D tensors, norm parameters and timm's exemptions (by id).

    Whatever a tensor is called, its shape decides: prompts, VP pads, AP deltas, LoRA factors and head
    weights (2+ dimensions) are decayed; biases, and what a module lists in timm's ``no_weight_decay()`` hook
    (a method's bias deltas among them), are not.
    """
    return parameter.ndim <= 1 or name.endswith("bias") or id(parameter) in norm_ids or id(parameter) in timm_exempt


def _classifier_parameter_ids(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids of the classifier's weights and biases (empty sets for a model without ``get_classifier``)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return set(), set()
    weights = {id(p) for n, p in head.named_parameters() if not n.endswith("bias")}
    return weights, {id(p) for n, p in head.named_parameters() if n.endswith("bias")}


def decay_group_of(model: nn.Module, cfg: TrainConfig) -> dict[str, str]:
    """Name -> group ("decay", "no_decay" or "head") of every tuned parameter under ``cfg``'s rule."""
    if hasattr(model, "tuned_named_parameters"):
        named = list(model.tuned_named_parameters())
    else:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no tuned parameters (nothing has requires_grad=True)")
    rule = "all" if cfg.decay_all else cfg.weight_decay_rule
    head_weights, head_biases = _classifier_parameter_ids(model)
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)
    }
    timm_exempt = _timm_no_weight_decay(model)
    groups = {}
    for name, parameter in named:
        if rule == "all":
            exempt = False
        elif rule == "all_but_head_bias":
            exempt = id(parameter) in head_biases
        else:
            exempt = is_decay_exempt(name, parameter, norm_ids, timm_exempt)
        if exempt:
            groups[name] = "no_decay"
        elif cfg.head_weight_decay is not None and id(parameter) in head_weights:
            groups[name] = "head"
        else:
            groups[name] = "decay"
    return groups


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Parameter groups of the tuned parameters: "decay", "no_decay" and, with ``head_weight_decay``, "head".

    Empty groups are left out. Each group carries a ``group`` entry with its name; torch keeps extra keys.
    """
    named = getattr(model, "tuned_named_parameters", model.named_parameters)
    parameters = dict(named())
    decay = {"decay": cfg.weight_decay, "no_decay": 0.0, "head": cfg.head_weight_decay}
    members: dict[str, list[nn.Parameter]] = {g: [] for g in decay}
    for name, group in decay_group_of(model, cfg).items():
        members[group].append(parameters[name])
    return [
        {"params": members[g], "weight_decay": decay[g], "group": g} for g in decay if members[g]
    ]


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
    (after the last of the T updates). With ``period`` P > 1 (steps per epoch, for a per-epoch schedule) the
    factor only changes every P updates: ``s`` is rounded down to a multiple of P. A plain callable object, so
    ``LambdaLR.state_dict`` saves its fields.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float, period: int = 1) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.period = period

    def __call__(self, step: int) -> float:
        step = step - step % self.period
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
    period = steps_per_epoch if cfg.schedule_unit == "epoch" else 1
    return LambdaLR(optimizer, WarmupCosine(warmup, total, cfg.min_lr / peak, period))
