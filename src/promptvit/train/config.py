"""``TrainConfig``: every option of one training run, validated, with unknown keys rejected.

The defaults are the EPT/MedFM optimiser (SGD, lr 6e-4, momentum 0.9, weight decay 1e-4, cosine annealing
to 0 without warm-up, 20 epochs, batch size 4) with one rule of our own for weight decay when no recipe is
given (``weight_decay_rule='standard'``: every tuned tensor of two or more dimensions is decayed, prompts,
pads, activation deltas, LoRA factors and head weights alike; biases, other 1-D tensors, normalisation
parameters and timm's ``no_weight_decay()`` names are not), PyTorch's default head init, frozen BatchNorm
statistics and a schedule stepped per optimiser update. The papers' own settings are named recipes
(:mod:`promptvit.recipes`, ``docs/recipes.md``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from promptvit.errors import ConfigError
from promptvit.evaluation.probability import DEFAULT_BINS
from promptvit.validation import MAX_SEED


class TrainConfig(BaseModel):
    """Options of one run of :func:`promptvit.train.fit`. Unknown keys raise a validation error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    epochs: int = Field(20, ge=1, description="Number of passes over the training set.")
    max_steps: int | None = Field(
        None,
        ge=1,
        description=(
            "Stop after this many optimiser steps; overrides `epochs` (the run then has "
            "ceil(max_steps / steps_per_epoch) epochs, the last one possibly partial, and the schedule "
            "spans max_steps)."
        ),
    )
    batch_size: int = Field(4, ge=1, description="Training batch size (the last batch may be smaller).")
    eval_batch_size: int = Field(64, ge=1, description="Batch size for validation and prediction.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="Optimiser: SGD with momentum, or AdamW.")
    lr: float = Field(6e-4, gt=0, description="Peak learning rate (before `scale_lr`).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by AdamW).")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay of the parameters that are decayed.")
    decay_all: bool = Field(
        False, description="Decay every tuned parameter: the same as weight_decay_rule='all'."
    )
    weight_decay_rule: Literal["standard", "all", "all_but_head_bias"] = Field(
        "standard",
        description=(
            "Which tuned tensors get `weight_decay`. 'standard': tensors of 2+ dimensions (prompts, pads, "
            "activation deltas, LoRA/adapter weights, head weight); biases, 1-D tensors, normalisation "
            "parameters and timm's no_weight_decay() names get none. 'all': every tuned tensor (EPT/mmcls). "
            "'all_but_head_bias': every tuned tensor but the classifier bias (VPT's code)."
        ),
    )
    head_weight_decay: float | None = Field(
        None,
        ge=0,
        description="Weight decay of the classifier weight (SPT/DA-VPT `wd_head`); None: `weight_decay`.",
    )
    head_init: Literal["default", "normal_0.01", "trunc_normal_0.02", "kaiming_fan_out_prior"] = Field(
        "default",
        description=(
            "Classifier init at the start of a fresh run. 'default': as created (PyTorch's Linear init); "
            "'normal_0.01': N(0, 0.01) weight, zero bias (mmcls, EPT); 'trunc_normal_0.02': timm's "
            "trunc_normal_(std=0.02) weight (bounds +-2), zero bias (SPT, DA-VPT); "
            "'kaiming_fan_out_prior': Kaiming-normal (fan out) "
            "weight, bias -log(99) (VPT)."
        ),
    )
    batchnorm_stats: Literal["frozen", "update"] = Field(
        "frozen",
        description=(
            "BatchNorm running statistics in training: 'frozen' keeps the pretrained ones (BatchNorm layers "
            "stay in eval mode even when their weights are tuned, as few-shot batches of a handful of "
            "images give useless estimates); 'update' re-estimates them in tuned modules."
        ),
    )
    recipe: str | None = Field(
        None, description="The named recipe (name@version) these values came from, recorded with the run."
    )
    warmup_epochs: float = Field(
        0, ge=0, description="Linear warm-up length in epochs (fractions allowed); the lr starts at 0."
    )
    schedule_unit: Literal["step", "epoch"] = Field(
        "step",
        description=(
            "Update the warm-up + cosine lr every optimiser step, or once per epoch (the lr of a whole epoch "
            "is the one at its first step, as mmcv's and VPT's per-epoch schedulers)."
        ),
    )
    min_lr: float = Field(0, ge=0, description="Learning rate reached at the end of the cosine decay.")
    scale_lr: bool = Field(False, description="Use lr x batch_size / 256 as the peak lr (VPT convention).")
    grad_clip: float | None = Field(
        None, gt=0, description="Clip the global gradient norm of the tuned parameters to this value."
    )
    grad_clip_value: float | None = Field(
        None,
        gt=0,
        description=(
            "Clip every gradient element of the tuned parameters to [-value, value] (DA-VPT: 10), after fp16 "
            "unscaling and before `grad_clip`."
        ),
    )
    sampler: Literal["shuffle", "class_balanced"] = Field(
        "shuffle",
        description=(
            "Training batch order: 'shuffle' (a seeded shuffle per epoch) or 'class_balanced' (DA-VPT's class "
            "sampler: batch_size / samples_per_class classes per batch, every class drawn equally often per "
            "epoch, N // batch_size batches; promptvit.train.sampling)."
        ),
    )
    samples_per_class: int = Field(
        2, ge=1, description="'class_balanced': images of each drawn class in a batch (divides batch_size)."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seeds initialisation, shuffling and augmentation.")
    select_metric: str | None = Field(
        None,
        description=(
            "Validation metric that selects the epoch whose tuned state is kept: 'accuracy' "
            "(single-label) or 'map' (multi-label) when None. 'loss' selects the lowest val loss."
        ),
    )
    eval_every: int = Field(1, ge=1, description="Validate every this many epochs, and always at the last.")
    device: str = Field(
        "auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'..."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    progress: bool = Field(True, description="Show a tqdm progress bar with loss and lr.")
    log_tensorboard: bool = Field(
        False,
        description=(
            "Also write TensorBoard scalars to run_dir/tensorboard (needs `tensorboard`): train/, val/, method/ "
            "per epoch, train/loss_step and lr per optimiser step, test/ after the test pass."
        ),
    )
    log_nmi: bool = Field(
        False,
        description=(
            "After every epoch, log the prompt/patch NMI of each prompted block (SPT eq. 7-8) on a fixed "
            "batch of up to 32 validation (else training) images, as nmi_block<i> columns of log.csv."
        ),
    )

    cache_prefix: bool = Field(
        False,
        description=(
            "Compute the frozen prefix of the network (everything before the method's first tuned block, "
            "Method.tuned_from_block) once per image and reuse it in every epoch and validation pass "
            "(promptvit.cache). Exact; needs deterministic training transforms unless `cache_views` > 0. "
            "No effect (a warning) for methods that tune from block 0."
        ),
    )
    cache_dir: str | None = Field(
        None,
        description=(
            "Also keep prefix-cache entries on disk here, shared by runs, methods and processes (keyed by "
            "prefix weights, cut, transform and image identity); None: in memory for this run only."
        ),
    )
    cache_views: int = Field(
        0,
        ge=0,
        description=(
            "With `cache_prefix` and a randomly augmented training set: cache this many augmented views per "
            "image (each drawn once with a seed from the image and the view index); epoch e trains on view "
            "(e - 1) mod cache_views. 0: the training transforms must be deterministic."
        ),
    )
    grad_checkpointing: bool = Field(
        False,
        description=(
            "timm's gradient checkpointing on the backbone's blocks: recompute activations in the backward "
            "instead of storing them (less memory, ~1 more forward of time); same gradients."
        ),
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description=(
            "Autocast precision on CUDA (fp16 adds a gradient scaler). Ignored with a warning on CPU, where "
            "bf16 autocast is 6-8x slower than fp32 on CPUs without native bf16."
        ),
    )
    channels_last: bool = Field(
        False,
        description="channels_last memory format for model and images on CUDA; ignored (warning) on CPU.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except (RuntimeError, ValueError) as error:
                raise ValueError(
                    f"'{value}' is not a torch device ('auto', 'cpu', 'cuda', 'cuda:0'...)"
                ) from error
        return value

    @model_validator(mode="after")
    def _check_together(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.max_steps is None and self.warmup_epochs > self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs}); lower the warm-up "
                f"(--train.warmup-epochs {self.epochs / 10:g}) or train longer"
            )
        if self.decay_all and self.weight_decay_rule != "standard":
            raise ValueError(
                f"decay_all=True and weight_decay_rule='{self.weight_decay_rule}' disagree; set only "
                "weight_decay_rule"
            )
        if self.sampler == "class_balanced" and self.batch_size % self.samples_per_class:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of samples_per_class ({self.samples_per_class}) "
                "with sampler 'class_balanced'"
            )
        if self.cache_views and not self.cache_prefix:
            raise ValueError(f"train.cache_views {self.cache_views} needs train.cache_prefix true")
        return self

    @property
    def peak_lr(self) -> float:
        """The learning rate at the end of warm-up: ``lr``, times batch_size/256 when ``scale_lr``."""
        return self.lr * self.batch_size / 256 if self.scale_lr else self.lr

    def resolve_device(self) -> torch.device:
        """The device to train on; ``ConfigError`` if ``device`` names one this machine does not have."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0 or (device.index or 0) >= count:
                seen = f"{count} CUDA GPU(s) visible" if count else "no CUDA GPU is visible"
                raise ConfigError(
                    f"train.device '{self.device}' but {seen}; use --train.device auto (a GPU when there is "
                    "one, else the CPU) or cpu"
                )
        elif device.type == "mps" and not (torch.backends.mps.is_available()):
            raise ConfigError(f"train.device '{self.device}' but MPS is not available here; use auto or cpu")
        return device


#: options that change how a run is executed or displayed but not what it computes; a resumed run may
#: change them freely (all others must match the checkpoint)
OPERATIONAL_FIELDS = frozenset(
    {
        "eval_batch_size",
        "device",
        "num_workers",
        "progress",
        "log_tensorboard",
        "log_nmi",
        # exact on CPU (same tensors, same gradients), so a resumed run may switch them
        "cache_prefix",
        "cache_dir",
        "grad_checkpointing",
        "channels_last",
        # a label only: the values it stands for are fields of their own
        "recipe",
    }
)

#: fields left out of a checkpoint's setup while they hold these defaults, so that checkpoints written before
#: the fields existed still resume
OMITTED_AT_DEFAULT = {
    "cache_views": 0,
    "precision": "fp32",
    "weight_decay_rule": "standard",
    "schedule_unit": "step",
    "head_weight_decay": None,
    "head_init": "default",
    "batchnorm_stats": "frozen",
    "recipe": None,
    "grad_clip_value": None,
    "sampler": "shuffle",
    "samples_per_class": 2,
}


class EvaluationConfig(BaseModel):
    """How a run's probabilities are scored, thresholded and given an interval (``evaluation:`` in a run
    config; docs/clinical-evaluation.md). None of it changes training."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    ece_bins: int = Field(
        DEFAULT_BINS, ge=1, le=1000, description="Bins of ECE, equal-mass ECE, MCE and the reliability diagrams."
    )
    threshold_rule: Literal["youden", "sensitivity"] = Field(
        "youden",
        description=(
            "Decision threshold of binary and multi-label tasks, chosen on validation: 'youden' maximises "
            "sensitivity + specificity - 1; 'sensitivity' takes the highest threshold whose validation "
            "sensitivity reaches `target_sensitivity`."
        ),
    )
    target_sensitivity: float = Field(
        0.9, gt=0, le=1, description="The sensitivity the 'sensitivity' threshold rule must reach on val."
    )
    bootstrap_resamples: int = Field(
        1000, ge=100, le=100_000, description="Resamples of the percentile bootstrap CI of the main metric."
    )
    ci_level: float = Field(0.95, gt=0.5, lt=1, description="Coverage of the bootstrap interval.")
    calibration: Literal["checked", "always"] = Field(
        "checked",
        description=(
            "'checked': keep the uncalibrated probabilities (with a warning, recorded as applied: false) when "
            "validation has fewer than `calibration_min_per_class` images in a class or the fit sits at a "
            "bound; 'always': apply the fit regardless."
        ),
    )
    calibration_min_per_class: int = Field(
        10,
        ge=1,
        description="Validation images per class (multi-label: positives and negatives) a fit needs.",
    )
