"""The training loop: ``fit`` (with checkpoints, exact resume and validation-based selection),
``evaluate`` and ``predict_scores``. What a checkpoint holds and how a run resumes is in
``train/checkpoint.py``; the hooks around epochs (log.csv, TensorBoard, measurements such as NMI) in
``train/callbacks.py``.

The engine sees tuning methods only through ``PromptModel`` and the hooks of ``Method``
(``needs_data_init``/``initialize_from_data``, ``auxiliary_loss``, ``on_epoch_end``). Datasets are plain
torch datasets of ``(image, target)`` pairs: ``target`` is a ``torch.long`` scalar (single-label) or a
float32 multi-hot vector (multi-label).

Run folder written by ``fit`` (every file atomically, via ``promptvit.io``)::

    run_dir/
      log.csv                  one row per finished epoch (rewritten each epoch)
      metrics.json             at the end: selection, val metrics at the selected epoch, timing, parameters
      checkpoint/
        checkpoint.json        epoch, step, history, best so far, optimiser/scheduler scalars, setup
        tensors-NNNNNN.safetensors   tuned state, best state, optimiser tensors (named in checkpoint.json)
      artifact/                adapter_config.json + adapter_model.safetensors of the selected epoch
      tensorboard/             only with log_tensorboard=True (event files are appended, not atomic)

Epochs are numbered from 1; ``method.on_epoch_end(model, epoch)`` receives that number. A method with
``needs_data_init`` gets ``initialize_from_data(model, batches)`` once before the first epoch (not again on
resume: its result is part of the tuned state), with the model in eval mode under ``torch.no_grad()`` and
``batches`` yielding ``(images, targets)`` of the training set in a seeded shuffled order
(``eval_batch_size`` at a time, on the device).

Speed options (``TrainConfig``): ``cache_prefix`` computes the frozen prefix of the network (up to
``model.cache_cut()``, the method's ``tuned_from_block``) once per training/validation image through a
:class:`promptvit.cache.PrefixCache` (pass ``prefix_cache=`` to share one between runs and with test-set
evaluation) and trains ``forward_from_block`` on it, with the same batches in the same order, so on CPU the
run equals an uncached one. A randomly augmented training set is refused unless ``cache_views`` > 0 (epoch e
then trains on cached view (e - 1) mod cache_views). ``grad_checkpointing`` turns on timm's checkpointing
for the run. ``precision`` (bf16/fp16 autocast, fp16 with a gradient scaler) and ``channels_last`` act on CUDA
only; on CPU they are ignored with a warning (bf16 autocast is 6-8x slower there), so the CPU path stays exact.

Determinism: the run is seeded from ``config.seed``; each epoch reseeds Python/NumPy/torch and shuffles with
a generator seeded from (seed, epoch) (``sampler: class_balanced`` draws its batches from the same generator,
:mod:`promptvit.train.sampling`), so a resumed run replays exactly what an uninterrupted one does (on
CPU bit for bit; ``torch.use_deterministic_algorithms`` is not switched on, so CUDA runs may differ in the
last bits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from promptvit.artifact import load_tuned_state
from promptvit.cache import CachedBatches, PrefixCache, check_deterministic, random_transform_steps
from promptvit.errors import ConfigError, TrainingError
from promptvit.evaluation.probability import DEFAULT_BINS, scores_from_logits
from promptvit.io import atomic_write_text
from promptvit.model import PromptModel
from promptvit.train import distributed
from promptvit.train.callbacks import (
    LOG_FILE,
    Callback,
    TensorBoardLogger,
    check_requested,
    write_log,
)
from promptvit.train.checkpoint import (
    CHECKPOINT_DIR,
    TrainingState,
    compare_setup,
    dumps,
    jsonable,
    prefixed,
    read_checkpoint,
    save_checkpoint,
    setup_of,
    tuned_snapshot,
)
from promptvit.train.config import TrainConfig
from promptvit.train.head_init import init_head
from promptvit.train.losses import check_targets, classification_loss
from promptvit.train.metrics import LOWER_IS_BETTER, compute_metrics, selectable_metrics
from promptvit.train.optim import build_optimizer, build_scheduler, num_epochs, total_steps
from promptvit.train.probe import fit_lbfgs_probe
from promptvit.train.sampling import batches_per_epoch, epoch_batches

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ARTIFACT_DIR = "artifact"


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns. ``best_metric`` is None when the epoch was not chosen by validation."""

    best_epoch: int
    best_metric: float | None
    selection: str
    history: list[dict[str, Any]]
    artifact_dir: Path
    run_dir: Path
    #: validation metrics (full, with per-class values) at the selected epoch; None without validation
    val_metrics: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (run seed, epoch); epoch 0 is the data-dependent initialisation."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        return batch["image"], batch.get("target")
    return batch, None


def _loader(
    data: Dataset | DataLoader, batch_size: int, num_workers: int, device: torch.device
) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    return DataLoader(
        data, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda"
    )


def _scalars(prefix: str, values: dict[str, Any], *, keep_text: bool = False) -> dict[str, Any]:
    """Flatten numbers (and dicts of numbers, as ``prefix + key/sub``) for a log row; drop the rest.

    ``keep_text`` also keeps short strings (a method's class-to-prompt mapping, say) for log.csv.
    """
    row: dict[str, Any] = {}
    for key, value in jsonable(values).items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        text = keep_text and isinstance(value, str) and len(value) <= 500
        if value is None or number or text:
            row[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            for sub, item in value.items():
                if item is None or (isinstance(item, (int, float)) and not isinstance(item, bool)):
                    row[f"{prefix}{key}/{sub}"] = item
    return row


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast_for(
    precision: str, device: torch.device, *, warn: bool = True
) -> tuple[Callable, torch.dtype | None]:
    """(context factory, autocast dtype): autocast on CUDA for bf16/fp16; fp32 (no autocast) elsewhere."""
    if precision == "fp32":
        return contextlib.nullcontext, None
    if precision not in _AMP_DTYPES:
        raise ConfigError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if device.type != "cuda":
        if warn:
            message = (
                f"precision='{precision}' is ignored on {device.type}: autocast is used on CUDA only (bf16 "
                "autocast runs 6-8x slower than fp32 on CPUs without native bf16); running in fp32"
            )
            logger.warning(message)
            warnings.warn(message, stacklevel=3)
        return contextlib.nullcontext, None
    dtype = _AMP_DTYPES[precision]
    return (lambda: torch.autocast(device_type="cuda", dtype=dtype)), dtype


# ------------------------------------------------------------------------------------ evaluation


def _forward_all(
    model: PromptModel,
    data: Dataset | DataLoader,
    *,
    batch_size: int,
    device: torch.device | str | None,
    num_workers: int = 0,
    prefix_cache: PrefixCache | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (float32, CPU) of every item, and the stacked targets when the items have them; ``progress``
    shows a bar over the batches on a terminal."""
    if device is not None:
        model.to(device)
    device = _model_device(model)
    autocast, autocast_dtype = _autocast_for(precision, device)
    cut = model.cache_cut() if prefix_cache is not None else 0
    if cut and isinstance(data, DataLoader):
        logger.info("prefix caching needs a dataset, not a DataLoader; evaluating without it")
        cut = 0
    if cut:
        outputs, cached_targets = prefix_cache.prefix_outputs(
            model,
            data,
            cut,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            autocast=autocast,
            autocast_dtype=autocast_dtype,
        )
    was_training = model.training
    model.eval()
    logits, targets = [], []
    try:
        with torch.inference_mode():
            batches = (
                CachedBatches(outputs, cached_targets, batch_size=batch_size)
                if cut
                else _loader(data, batch_size, num_workers, device)
            )
            bar = tqdm(
                batches, desc="predicting", unit="batch", disable=None if progress else True, leave=False
            )
            for batch in bar:
                images, target = _split_batch(batch)
                with autocast():
                    images = images.to(device, non_blocking=True)
                    out = model.forward_from_block(images, cut) if cut else model(images)
                logits.append(out.float().cpu())
                if target is not None:
                    targets.append(torch.as_tensor(target).cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("the dataset is empty")
    return torch.cat(logits), (torch.cat(targets) if len(targets) == len(logits) else None)


def predict_scores(
    model: PromptModel,
    data: Dataset | DataLoader,
    *,
    multilabel: bool,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    prefix_cache: PrefixCache | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Class probabilities (N, C) on the CPU: softmax (single-label) or sigmoid (multi-label).

    ``data`` is a dataset of images or ``(image, target)`` pairs, or a DataLoader over them. Runs in
    ``torch.inference_mode()`` with the model in eval mode (its previous mode is restored). ``device``
    moves the model there first; default: where the model is. ``prefix_cache`` reuses (and fills) the
    frozen-prefix outputs of a deterministic dataset up to ``model.cache_cut()`` (no effect at cut 0 or
    for a DataLoader); ``precision`` 'bf16'/'fp16' autocasts on CUDA (ignored with a warning elsewhere).
    """
    logits, _ = _forward_all(
        model,
        data,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        prefix_cache=prefix_cache,
        precision=precision,
    )
    return scores_from_logits(logits, multilabel)


def predict_logits(
    model: PromptModel,
    data: Dataset | DataLoader,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    prefix_cache: PrefixCache | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (N, C, float32, CPU) and the stacked targets (None for unlabelled items), for calibration;
    ``progress`` shows a bar over the batches on a terminal."""
    return _forward_all(
        model,
        data,
        batch_size=batch_size,
        device=device,
        prefix_cache=prefix_cache,
        precision=precision,
        progress=progress,
    )


def evaluate(
    model: PromptModel,
    dataset: Dataset | DataLoader,
    *,
    multilabel: bool,
    class_names: list[str],
    batch_size: int = 64,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    prefix_cache: PrefixCache | None = None,
    precision: str = "fp32",
    bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """``compute_metrics`` on ``dataset`` (percentages) plus ``loss`` (the training loss, mean per image).

    ``prefix_cache`` and ``precision`` as in :func:`predict_scores`. Evaluating several methods on one test
    set with the same cache computes each shared prefix (same backbone, same cut) once.
    """
    logits, targets = _forward_all(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        prefix_cache=prefix_cache,
        precision=precision,
    )
    if targets is None:
        raise ValueError("evaluate needs (image, target) items; use predict_scores for unlabelled data")
    check_targets(targets, logits.shape[1], multilabel)
    metrics = compute_metrics(
        scores_from_logits(logits, multilabel), targets, multilabel, class_names, bins=bins
    )
    metrics["loss"] = float(classification_loss(logits, targets, multilabel))
    return metrics


# ------------------------------------------------------------------------------------------- fit


def _is_better(value: float | None, best: float | None, metric: str) -> bool:
    """Strictly better (ties keep the earlier epoch); an uncomputable value never wins."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return False
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def _nan_message(
    what: str,
    epoch: int,
    step: int,
    batch_index: int,
    lr: float,
    images: torch.Tensor,
    parts: dict[str, float],
) -> str:
    finite_inputs = bool(torch.isfinite(images).all())
    causes = []
    if not finite_inputs:
        causes.append("the input batch contains NaN/inf values (check the data and transforms)")
    if "aux_loss" in parts and not math.isfinite(parts["aux_loss"]):
        causes.append("the method's auxiliary loss diverged")
    causes.append(f"the learning rate is too high (lr now {lr:g}); lower it or add grad_clip")
    if finite_inputs:
        causes.append("bad inputs or targets (e.g. unnormalised images, wrong label encoding)")
    values = ", ".join(f"{k}={v}" for k, v in parts.items())
    return (
        f"{what} at epoch {epoch}, optimiser step {step} (batch {batch_index} of the epoch; {values}). "
        f"Likely causes: {'; '.join(causes)}. The checkpoint of the last finished epoch is left intact."
    )


def _train_epoch(
    model: PromptModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    *,
    config: TrainConfig,
    device: torch.device,
    epoch: int,
    epochs: int,
    step: int,
    last_step: int,
    multilabel: bool,
    cut: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    callbacks: Sequence[Callback] = (),
) -> tuple[dict[str, Any], int]:
    """One pass (stops early at ``last_step``); returns (row entries, global step after the epoch).

    With ``cut`` > 0 the loader yields cached prefix outputs and the model runs ``forward_from_block``.
    """
    model.train()
    params = [p for _, p in model.tuned_named_parameters()]
    seen = 0
    loss_sum = 0.0
    aux_sum = 0.0
    aux_seen = 0
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}/{epochs}",
        disable=None if config.progress else True,  # None: shown on a terminal, silent in logs and CI
        leave=False,
        dynamic_ncols=True,
    )
    try:
        for batch_index, batch in enumerate(bar):
            images, targets = _split_batch(batch)
            if targets is None:
                raise ValueError("training items must be (image, target) pairs")
            images = images.to(device, non_blocking=True)
            if channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            check_targets(targets, model.num_classes, multilabel)
            lr = optimizer.param_groups[0]["lr"]
            with autocast():
                logits = model.forward_from_block(images, cut) if cut else model(images)
                loss = classification_loss(logits.float(), targets, multilabel)
                aux = model.method.auxiliary_loss(model, targets)
                total = loss if aux is None else loss + aux
            parts = {"loss": float(loss.detach())}
            if aux is not None:
                parts["aux_loss"] = float(aux.detach())
            if not math.isfinite(float(total.detach())):
                raise TrainingError(
                    _nan_message("non-finite training loss", epoch, step + 1, batch_index, lr, images, parts)
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(total).backward()
            else:
                total.backward()
            distributed.average_gradients(params)  # no-op unless under torchrun
            if scaler is not None and (config.grad_clip is not None or config.grad_clip_value is not None):
                scaler.unscale_(optimizer)
            if config.grad_clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, config.grad_clip_value)
            if config.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                # Under fp16 loss scaling an overflow is expected now and then: the scaler skips that step.
                if not torch.isfinite(norm) and scaler is None:
                    raise TrainingError(
                        _nan_message(
                            "non-finite gradient norm", epoch, step + 1, batch_index, lr, images, parts
                        )
                    )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            n = images.shape[0]
            seen += n
            loss_sum += parts["loss"] * n
            if aux is not None:
                aux_sum += parts["aux_loss"] * n
                aux_seen += n
            for callback in callbacks:
                callback.on_step(step, {"loss": parts["loss"], "lr": lr})
            bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{lr:.3g}", refresh=False)
            if step >= last_step:
                break
    finally:
        bar.close()
    seen, loss_sum, aux_sum, aux_seen = distributed.sum_over_ranks([seen, loss_sum, aux_sum, aux_seen])
    if seen == 0:
        raise ValueError("the training loader produced no batches")
    row: dict[str, Any] = {"train_loss": loss_sum / seen}
    if aux_seen:
        row["aux_loss"] = aux_sum / aux_seen
    row["lr"] = lr
    return row, step


def _check_finite_parameters(model: PromptModel, epoch: int) -> None:
    bad = [n for n, p in model.tuned_named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(
            f"tuned parameters became non-finite during epoch {epoch} ({bad[:5]}). Likely causes: the "
            "learning rate is too high (lower it or add grad_clip) or bad inputs. The checkpoint of the "
            "last finished epoch is left intact."
        )


def _data_init(
    model: PromptModel, train_set: Dataset, config: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """Run ``method.initialize_from_data`` on ``(images, targets)`` batches of the training set.

    The order is a seeded shuffle: methods that cap how many images they read (SPT's ``max_images``) would
    otherwise see only the first classes of a class-sorted folder.
    """
    order = torch.Generator().manual_seed(derived_seed(config.seed, 0))
    loader = DataLoader(
        train_set,
        batch_size=config.eval_batch_size,
        shuffle=True,
        generator=order,
        num_workers=config.num_workers,
    )

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in loader:
            images, targets = _split_batch(batch)
            yield images.to(device), (targets.to(device) if targets is not None else None)

    torch.manual_seed(derived_seed(config.seed, 0))
    model.eval()
    with torch.no_grad():
        info = model.method.initialize_from_data(model, batches()) or {}
    logger.info("data-dependent initialisation of %s: %s", model.method.name, info)
    return jsonable(info)


def _prefix_plan(
    model: PromptModel,
    config: TrainConfig,
    train_set: Dataset,
    val_set: Dataset | None,
    prefix_cache: PrefixCache | None,
) -> tuple[PrefixCache | None, int, int]:
    """(cache, cut, views) for ``config.cache_prefix``; cut 0 means training without the cache."""
    if not config.cache_prefix:
        return None, 0, 0
    cut = model.cache_cut()
    if cut == 0:
        where = (
            "CNN backbones can only cache the pre-logit features (linear, mlp)"
            if model.geometry.kind != "vit"
            else f"its tuned_from_block() is {model.method.tuned_from_block()}"
        )
        message = (
            f"cache_prefix: method '{model.method.name}' has no frozen prefix to cache ({where}); "
            "training and validating without the cache"
        )
        logger.warning(message)
        warnings.warn(message, stacklevel=3)
        return None, 0, 0
    cache = prefix_cache if prefix_cache is not None else PrefixCache(config.cache_dir)
    if val_set is not None:
        check_deterministic(val_set)  # validation is cached too: fail now rather than after epoch 1
    if not config.cache_views:
        check_deterministic(train_set)  # CacheError (a ConfigError) for random augmentation
        return cache, cut, 0
    try:
        check_deterministic(train_set)
    except ConfigError:
        logger.info(
            "cache_prefix: %d augmented views per training image (%s); epoch e trains on view (e - 1) mod %d",
            config.cache_views,
            ", ".join(random_transform_steps(train_set)) or "random transform",
            config.cache_views,
        )
        return cache, cut, config.cache_views
    logger.info("cache_prefix: the training transforms are deterministic; cache_views is not needed")
    return cache, cut, 0


def _enable_grad_checkpointing(model: PromptModel, enable: bool) -> bool | None:
    """Switch timm's gradient checkpointing on; returns the previous setting (None: left untouched)."""
    if not enable:
        return None
    backbone = model.backbone
    if not hasattr(backbone, "set_grad_checkpointing"):
        raise ConfigError(f"grad_checkpointing: {type(backbone).__name__} has no set_grad_checkpointing()")
    previous = bool(getattr(backbone, "grad_checkpointing", False))
    backbone.set_grad_checkpointing(True)
    return previous


def _use_channels_last(model: PromptModel, enable: bool, device: torch.device) -> bool:
    if not enable:
        return False
    if device.type != "cuda":
        message = (
            f"channels_last is ignored on {device.type} (it only changes the patch-embedding conv there)"
        )
        logger.warning(message)
        warnings.warn(message, stacklevel=3)
        return False
    model.to(memory_format=torch.channels_last)
    return True


def _result_from_meta(meta: dict[str, Any], run_dir: Path) -> FitResult:
    return FitResult(
        best_epoch=meta["best_epoch"],
        best_metric=meta["best_metric"],
        selection=meta["selection"],
        history=meta["history"],
        artifact_dir=run_dir / ARTIFACT_DIR,
        run_dir=run_dir,
        val_metrics=meta["best_val_metrics"],
    )


def _check_fit_arguments(
    model: PromptModel,
    train_set: Dataset,
    val_set: Dataset | None,
    config: TrainConfig,
    class_names: list[str],
    extra_artifact_info: dict[str, Any] | None,
) -> Dataset | None:
    """Refuse what cannot train; returns the validation set to use (None for an empty one)."""
    if len(class_names) != model.num_classes:
        raise ConfigError(f"{len(class_names)} class names for a model with {model.num_classes} outputs")
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    reserved = {"class_names", "multilabel", "selection"} & set(extra_artifact_info or {})
    if reserved:
        raise ConfigError(f"extra_artifact_info must not set {sorted(reserved)}; fit records them itself")
    return None if val_set is not None and len(val_set) == 0 else val_set


class _EpochBatches:
    """Each epoch's training batches: images, or with a prefix cut the cached prefix outputs of its view."""

    def __init__(
        self,
        model: PromptModel,
        train_set: Dataset,
        config: TrainConfig,
        cache: PrefixCache | None,
        cut: int,
        views: int,
        device: torch.device,
        autocast: bool,
        autocast_dtype: torch.dtype | None,
        ranks: Any = None,
    ) -> None:
        self.model, self.train_set, self.config, self.cache = model, train_set, config, cache
        self.ranks = ranks  # under torchrun: this rank's share of every batch (train.distributed)
        self.cut, self.views, self.device = cut, views, device
        self.autocast, self.autocast_dtype = autocast, autocast_dtype
        # The training set's prefix outputs for the current view; without views every epoch reuses them.
        self.prefix: dict[int | None, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def loader(self, epoch: int, generator: torch.Generator) -> Any:
        config, pin = self.config, self.device.type == "cuda"
        balanced = epoch_batches(config, self.train_set, generator)  # None: the seeded shuffle
        if not self.cut and self.ranks is not None:
            return distributed.ShardedBatches(
                self.train_set,
                global_batch=config.batch_size,
                generator=generator,
                ranks=self.ranks,
                num_workers=config.num_workers,
                pin_memory=pin,
                batch_sampler=balanced,
            )
        if not self.cut and balanced is not None:
            return DataLoader(
                self.train_set,
                batch_sampler=balanced,
                generator=generator,
                num_workers=config.num_workers,
                pin_memory=pin,
            )
        if not self.cut:
            return DataLoader(
                self.train_set,
                batch_size=config.batch_size,
                shuffle=True,
                generator=generator,
                num_workers=config.num_workers,
                pin_memory=pin,
            )
        view = (epoch - 1) % self.views if self.views else None
        if view not in self.prefix:
            assert self.cache is not None
            self.prefix = {
                view: self.cache.prefix_outputs(
                    self.model,
                    self.train_set,
                    self.cut,
                    view=view,
                    batch_size=config.eval_batch_size,
                    num_workers=config.num_workers,
                    device=self.device,
                    autocast=self.autocast,
                    autocast_dtype=self.autocast_dtype,
                    check=False,
                )
            }
        outputs, cached_targets = self.prefix[view]
        # Same length and sampler seed as the uncached loader, hence the same batches in the same order.
        return CachedBatches(
            outputs,
            cached_targets,
            batch_size=config.batch_size,
            shuffle=True,
            generator=generator,
            pin_memory=pin,
            batch_sampler=balanced,
        )


def _summary(
    state: TrainingState,
    selection: str,
    last_epoch: int,
    select_metric: str | None,
    model: PromptModel,
    config: TrainConfig,
    device: torch.device,
    speed: dict[str, Any],
) -> dict[str, Any]:
    """``metrics.json`` of a finished run; ``speed``: the speed options as the run used them."""
    seconds = [row["seconds"] for row in state.history]
    return {
        "best_epoch": state.best_epoch,
        "selection": selection,
        "select_metric": select_metric,
        "best_metric": state.best_metric,
        "val": state.best_val_metrics,
        "epochs": last_epoch,
        "steps": state.step,
        "timing": {
            "total_seconds": sum(seconds),
            "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else None,
            "device": str(device),
        },
        "parameters": model.parameter_summary(),
        "speed": speed,
        "method": model.method.name,
        "data_init": state.data_init,
        "config": config.model_dump(),
    }


def fit(
    model: PromptModel,
    train_set: Dataset,
    val_set: Dataset | None = None,
    *,
    config: TrainConfig | dict[str, Any],
    run_dir: str | Path,
    multilabel: bool,
    class_names: list[str],
    extra_artifact_info: dict[str, Any] | None = None,
    resume: bool = True,
    fingerprint: dict[str, Any] | None = None,
    prefix_cache: PrefixCache | None = None,
    callbacks: Sequence[Callback] = (),
    ece_bins: int = DEFAULT_BINS,
) -> FitResult:
    """Train ``model``'s tuned parameters on ``train_set``; select the epoch on ``val_set``; save the artifact.

    Args:
        model: a wrapped model (``promptvit.wrap``); trained in place and left holding the selected state.
        train_set: items ``(image, target)``; shuffled each epoch with a generator seeded from (seed, epoch).
        val_set: validation items, or None: then the last epoch is kept. Never pass the test set here.
        config: a ``TrainConfig`` (or a dict validated into one).
        run_dir: folder for log.csv, metrics.json, checkpoint/ and artifact/ (see the module docstring).
        multilabel: multi-hot float targets, BCE loss and mAP; else class indices, CE and accuracy.
        class_names: one name per model output, in order; recorded in the artifact.
        extra_artifact_info: more JSON entries for the artifact's ``adapter_config.json`` (dataset, protocol...).
        resume: continue from ``run_dir/checkpoint`` when it exists (a finished run is returned at once);
            False starts over, discarding that checkpoint and metrics.json.
        fingerprint: what else identifies the run (dataset name, split, ...). A checkpoint is resumed only if
            its fingerprint, the compared config fields (all but eval_batch_size, device, num_workers,
            progress, log_tensorboard), the method and its options, the backbone, the classes and the
            dataset sizes all match; otherwise ``ResumeError`` names the differing keys.
        prefix_cache: the cache used with ``config.cache_prefix`` (default: a new one, on disk under
            ``config.cache_dir`` if set); pass one to share prefixes with other runs or test evaluation.
        callbacks: watchers of the epochs (``promptvit.train.callbacks``), e.g. the NMI logger that
            ``config.log_nmi`` asks for; TensorBoard (``config.log_tensorboard``) is added here.
        ece_bins: bins of the validation ECE, equal-mass ECE and MCE.

    Raises:
        TrainingError: non-finite loss, gradient norm or parameters (the last checkpoint stays intact).
        ResumeError: the checkpoint does not belong to this run or is unreadable.
        ConfigError: options that do not fit the task (e.g. a select_metric of the other task type).
    """
    if not isinstance(config, TrainConfig):
        config = TrainConfig.model_validate(config)
    run_dir = Path(run_dir)
    class_names = list(class_names)
    val_set = _check_fit_arguments(model, train_set, val_set, config, class_names, extra_artifact_info)
    if config.recipe is not None:  # the artifact names the recipe its training values came from
        extra_artifact_info = {"recipe": config.recipe, **(extra_artifact_info or {})}
    callbacks = list(callbacks)
    check_requested(config, callbacks)
    select = config.select_metric or ("map" if multilabel else "accuracy")
    if select not in selectable_metrics(multilabel):
        raise ConfigError(
            f"select_metric '{select}' is not available for {'multi' if multilabel else 'single'}-label tasks; "
            f"choose one of {list(selectable_metrics(multilabel))}"
        )

    # Speed options first, so that a refused cache (random augmentation) fails before the run folder changes.
    cache, cut, views = _prefix_plan(model, config, train_set, val_set, prefix_cache)
    ranks, device = distributed.setup(config.resolve_device())  # (None, device) unless under torchrun
    if ranks is not None and cut:
        raise ConfigError("train.cache_prefix is not supported under torchrun yet; turn it off for this run")
    writes = distributed.is_writer()  # rank 0 alone writes run files
    autocast, autocast_dtype = _autocast_for(config.precision, device)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype is torch.float16 else None

    checkpoint_dir = run_dir / CHECKPOINT_DIR
    state = TrainingState(setup_of(model, config, multilabel, class_names, train_set, val_set, fingerprint))
    saved = read_checkpoint(checkpoint_dir) if resume else None
    if saved is not None:
        compare_setup(saved[0]["setup"], state.setup, checkpoint_dir)
    elif not resume and writes:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)

    def save_artifact(selection: str) -> None:
        if not writes:
            return
        model.save_pretrained(
            run_dir / ARTIFACT_DIR,
            class_names=class_names,
            multilabel=multilabel,
            selection=selection,
            **(extra_artifact_info or {}),
        )

    model.to(device)
    channels_last = _use_channels_last(model, config.channels_last, device)
    if saved is not None and saved[0]["finished"]:
        meta, tensors = saved
        load_tuned_state(model, prefixed(tensors, "model/"), str(checkpoint_dir))
        if not (run_dir / ARTIFACT_DIR).is_dir():
            save_artifact(meta["selection"])
        logger.info("%s already finished; returning its result", run_dir)
        return _result_from_meta(meta, run_dir)

    steps_per_epoch = batches_per_epoch(config, len(train_set))
    epochs = num_epochs(config, steps_per_epoch)
    last_step = total_steps(config, steps_per_epoch)
    seed_everything(config.seed)
    model.update_batchnorm_stats = config.batchnorm_stats == "update"
    if saved is None:
        init_head(model.get_classifier(), config.head_init)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    if saved is not None:
        state.restore(saved, model, optimizer, scheduler, scaler, checkpoint_dir)
        logger.info("resuming from epoch %d (step %d) of %s", state.epoch, state.step, run_dir)
    elif model.method.needs_data_init:
        state.data_init = _data_init(model, train_set, config, device)

    if saved is None and model.method.fits_head_to_convergence():
        # A head fitted to convergence on cached features replaces the epochs (promptvit.train.probe).
        started = time.perf_counter()
        probe = fit_lbfgs_probe(
            model,
            train_set,
            val_set,
            multilabel=multilabel,
            select=select,
            class_names=class_names,
            device=device,
            batch_size=config.eval_batch_size,
            l2_grid=model.method.config.l2_grid,
            bins=ece_bins,
            prefix_cache=cache if cut == model.geometry.depth else None,
        )
        row = {
            "epoch": 1,
            "step": 0,
            "probe_l2": probe.l2,
            "probe_l2_rule": probe.rule,
            **_scalars("val_", probe.val_metrics or {}),
        }
        logger.info("linear probe fitted by L-BFGS: L2 %.3g, %s", probe.l2, probe.rule)
        state.history = [jsonable({**row, "seconds": time.perf_counter() - started})]
        if writes:
            write_log(run_dir / LOG_FILE, state.history)
        if probe.val_metrics is not None:
            state.best_epoch, state.best_metric = 1, probe.val_metric
            state.best_val_metrics = jsonable(probe.val_metrics)
            state.best_state = tuned_snapshot(model)
        state.epoch = epochs  # no epochs to run

    if config.log_tensorboard and writes:
        callbacks.append(TensorBoardLogger(run_dir))
    previous_checkpointing = _enable_grad_checkpointing(model, config.grad_checkpointing)
    batches = _EpochBatches(
        model, train_set, config, cache, cut, views, device, autocast, autocast_dtype, ranks
    )
    try:
        for callback in callbacks:
            callback.on_fit_start(model, train_set, val_set)
        for epoch in range(state.epoch + 1, epochs + 1):
            started = time.perf_counter()
            epoch_seed = derived_seed(config.seed, epoch)
            seed_everything(epoch_seed)
            train_row, step = _train_epoch(
                model,
                batches.loader(epoch, torch.Generator().manual_seed(epoch_seed)),
                optimizer,
                scheduler,
                config=config,
                device=device,
                epoch=epoch,
                epochs=epochs,
                step=state.step,
                last_step=last_step,
                multilabel=multilabel,
                cut=cut,
                autocast=autocast,
                scaler=scaler,
                channels_last=channels_last,
                callbacks=callbacks,
            )
            method_info = model.method.on_epoch_end(model, epoch) or {}
            _check_finite_parameters(model, epoch)
            row: dict[str, Any] = {"epoch": epoch, "step": step, **train_row}
            row.update(_scalars("method_", method_info, keep_text=True))
            for callback in callbacks:
                row.update(callback.on_epoch_end(model, epoch))
            is_best = False
            if val_set is not None and (epoch % config.eval_every == 0 or epoch == epochs):
                metrics = evaluate(
                    model,
                    val_set,
                    multilabel=multilabel,
                    class_names=class_names,
                    batch_size=config.eval_batch_size,
                    num_workers=config.num_workers,
                    bins=ece_bins,
                    **({"prefix_cache": cache} if cut else {}),
                    **({"precision": config.precision} if autocast_dtype is not None else {}),
                )
                row.update(_scalars("val_", metrics))
                value = metrics.get(select)
                if _is_better(value, state.best_metric, select):
                    is_best = True
                    state.best_epoch, state.best_metric, state.best_val_metrics = epoch, value, jsonable(metrics)
                    state.best_state = tuned_snapshot(model)
            row["seconds"] = time.perf_counter() - started
            state.history.append(jsonable(row))
            if writes:
                write_log(run_dir / LOG_FILE, state.history)
            for callback in callbacks:
                callback.on_row(epoch, row)
            state.epoch, state.step, state.save_index = epoch, step, state.save_index + 1
            meta = state.meta(finished=False, best_is_current=is_best)
            if writes:
                save_checkpoint(checkpoint_dir, meta, model, optimizer, scheduler, state.best_state, scaler)
            logger.info(
                "epoch %d/%d: train_loss %.4f%s",
                epoch,
                epochs,
                row["train_loss"],
                f", val {select} {row['val_' + select]:.2f}" if row.get("val_" + select) is not None else "",
            )
    finally:
        for callback in callbacks:
            callback.close()
        if previous_checkpointing is not None:
            model.backbone.set_grad_checkpointing(previous_checkpointing)

    # ------------------------------------------------------------------ selection and artifact
    last_epoch = state.history[-1]["epoch"] if state.history else epochs
    if state.best_state is not None:
        load_tuned_state(model, state.best_state, f"tuned state of epoch {state.best_epoch}")
        selection = f"val {select} (best at epoch {state.best_epoch} of {last_epoch})"
    else:
        if val_set is None:
            selection = "last epoch (no validation set)"
        else:
            selection = f"last epoch (val {select} could not be computed at any epoch)"
        state.best_epoch, state.best_metric = last_epoch, None
    save_artifact(selection)
    speed = {
        "prefix_cut": cut,
        "cache_views": views,
        "prefix_cache": dict(cache.stats) if cache is not None else None,
        "grad_checkpointing": config.grad_checkpointing,
        "precision": config.precision if autocast_dtype is not None else "fp32",
        "channels_last": channels_last,
    }
    select_metric = select if val_set is not None else None
    summary = _summary(state, selection, last_epoch, select_metric, model, config, device, speed)
    if writes:
        atomic_write_text(run_dir / METRICS_FILE, dumps(summary))
    state.epoch, state.save_index = last_epoch, state.save_index + 1
    final = state.meta(finished=True, best_is_current=True, selection=selection)
    if writes:
        save_checkpoint(checkpoint_dir, final, model, optimizer, scheduler, None, scaler)
    distributed.barrier()  # the other ranks go on only once the run files are complete
    return _result_from_meta(final, run_dir)
