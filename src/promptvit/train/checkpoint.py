"""Checkpoints of ``fit``: what a run folder's ``checkpoint/`` holds and how a run continues from it.

``checkpoint.json`` names one ``tensors-NNNNNN.safetensors`` file (tuned state, the best state when it is
not the current one, optimiser tensors) and carries the scalars: epoch, step, history, best so far,
optimiser/scheduler/grad-scaler state and the run's *setup* (config, method, backbone fingerprint, classes,
dataset sizes). A checkpoint is resumed only when the setup matches (``compare_setup``); the tensors are
written first and the JSON switched atomically after, so a kill at any moment leaves a readable checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from promptvit.artifact import load_tuned_state
from promptvit.errors import ResumeError
from promptvit.io import atomic_write, atomic_write_text
from promptvit.model import PromptModel
from promptvit.train.config import OMITTED_AT_DEFAULT, OPERATIONAL_FIELDS, TrainConfig

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = 1


def jsonable(value: Any) -> Any:
    """Plain JSON value: tensors to numbers/lists, tuples to lists, non-finite floats to None."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def dumps(value: Any) -> str:
    return json.dumps(jsonable(value), indent=2, allow_nan=False) + "\n"


def setup_of(
    model: PromptModel,
    config: TrainConfig,
    multilabel: bool,
    class_names: list[str],
    train_set: Dataset,
    val_set: Dataset | None,
    fingerprint: dict[str, Any] | None,
) -> dict[str, Any]:
    """The flat dict a checkpoint must match to be resumed (operational config fields left out)."""
    setup: dict[str, Any] = {
        k: v
        for k, v in config.model_dump().items()
        if k not in OPERATIONAL_FIELDS and not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])
    }
    setup["method"] = model.method.name
    setup.update({f"method.{k}": v for k, v in model.config.to_dict().items()})
    setup.update(
        base_fingerprint=model.base_fingerprint,
        num_classes=model.num_classes,
        class_names=list(class_names),
        multilabel=multilabel,
        train_size=len(train_set),
        val_size=None if val_set is None else len(val_set),
    )
    for key, value in (fingerprint or {}).items():
        setup[key if key not in setup else f"fingerprint.{key}"] = value
    return jsonable(json.loads(json.dumps(jsonable(setup), default=str)))


def compare_setup(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    keys = sorted(set(saved) | set(current))
    missing = object()
    differing = [k for k in keys if saved.get(k, missing) != current.get(k, missing)]
    if differing:
        described = "; ".join(
            f"{k}: checkpoint {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
            for k in differing
        )
        raise ResumeError(
            f"{where} belongs to a run with another setup, differing in {differing} ({described}). "
            "Use another run_dir, or pass resume=False to start this run over in it."
        )


def tensor_file_names(directory: Path) -> list[Path]:
    return sorted(directory.glob("tensors-*.safetensors"))


def save_checkpoint(
    directory: Path,
    meta: dict[str, Any],
    model: PromptModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    best_state: dict[str, torch.Tensor] | None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Tensors first (a new file), then the JSON naming it (atomic switch), then old tensor files go."""
    tensors = {f"model/{k}": v for k, v in model.tuned_state_dict().items()}
    if best_state is not None and not meta["best_is_current"]:
        tensors.update({f"best/{k}": v for k, v in best_state.items()})
    optim_state = optimizer.state_dict()
    optim_extra: dict[str, dict[str, Any]] = {}
    for index, entries in optim_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                optim_extra.setdefault(str(index), {})[key] = value
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    name = f"tensors-{meta['save_index']:06d}.safetensors"
    atomic_write(directory / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    meta = {
        **meta,
        "tensors_file": name,
        "optimizer": {"param_groups": optim_state["param_groups"], "state_extra": optim_extra},
        "scheduler": scheduler.state_dict(),
        # fp16 loss scale and its growth counter: a resumed run continues with the scale it had reached
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
    }
    atomic_write_text(directory / CHECKPOINT_FILE, dumps(meta))
    for old in tensor_file_names(directory):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        tensors = load_file(str(directory / meta["tensors_file"]))
    except (OSError, json.JSONDecodeError, KeyError, SafetensorError, ValueError) as error:
        raise ResumeError(
            f"{directory} holds an unreadable checkpoint ({error}); start over with --no-resume "
            "(Python: resume=False)"
        ) from error
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path} has checkpoint format {meta.get('format')}, expected {CHECKPOINT_FORMAT}")
    return meta, tensors


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in prefixed(tensors, "optim/").items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta["optimizer"]["state_extra"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [dict(g) for g in meta["optimizer"]["param_groups"]]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}




def tuned_snapshot(model: PromptModel) -> dict[str, torch.Tensor]:
    """A CPU copy of the tuned tensors (the best epoch's state, kept while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.tuned_state_dict().items()}


@dataclasses.dataclass
class TrainingState:
    """Everything ``fit`` carries from epoch to epoch besides the model, optimiser and scheduler."""

    setup: dict[str, Any]
    epoch: int = 0
    step: int = 0
    save_index: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int | None = None
    best_metric: float | None = None
    best_val_metrics: dict[str, Any] | None = None
    data_init: dict[str, Any] | None = None

    def restore(
        self,
        saved: tuple[dict[str, Any], dict[str, torch.Tensor]],
        model: PromptModel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None,
        where: Path,
    ) -> None:
        """Put the model, optimiser, scheduler, scaler and this state back where the checkpoint left them."""
        meta, tensors = saved
        load_tuned_state(model, prefixed(tensors, "model/"), str(where))
        optimizer.load_state_dict(optimizer_state(meta, tensors))
        scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and meta.get("grad_scaler"):
            scaler.load_state_dict(meta["grad_scaler"])
        self.history = meta["history"]
        self.epoch, self.step, self.save_index = meta["epoch"], meta["step"], meta["save_index"]
        self.best_epoch, self.best_metric = meta["best_epoch"], meta["best_metric"]
        self.best_val_metrics = meta["best_val_metrics"]
        self.data_init = meta.get("data_init")
        if self.best_epoch is not None:
            self.best_state = (
                tuned_snapshot(model)
                if meta["best_is_current"]
                else prefixed(tensors, "best/")
            )

    def meta(self, *, finished: bool, best_is_current: bool, **extra: Any) -> dict[str, Any]:
        """The JSON half of a checkpoint (``save_checkpoint`` adds the optimiser and scheduler)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "finished": finished,
            "setup": self.setup,
            "epoch": self.epoch,
            "step": self.step,
            "save_index": self.save_index,
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "best_val_metrics": self.best_val_metrics,
            "best_is_current": best_is_current,
            "data_init": self.data_init,
            **extra,
        }
