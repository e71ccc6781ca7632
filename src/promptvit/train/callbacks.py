"""Callbacks of ``fit``: code that watches training without being part of it.

``fit`` calls, in order: ``on_fit_start`` once (fresh or resumed run), ``on_step`` after every optimiser
step (its loss and learning rate), after every epoch ``on_epoch_end`` (before validation; what it returns
joins the epoch's row of ``log.csv``) and ``on_row`` (the finished row: train, method, callback and
validation columns, seconds), and ``close`` when training stops, normally or not. A callback must not change the model or consume random numbers, so a run with or
without it trains the same.

The engine imports no analysis code: measurements such as the prompt/patch NMI are callbacks built above it
(``promptvit.analysis_callbacks.NMILogger``) and handed to ``fit(callbacks=...)`` by the run pipeline.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from promptvit.errors import ConfigError
from promptvit.io import atomic_write_text
from promptvit.model import PromptModel

LOG_FILE = "log.csv"
TENSORBOARD_DIR = "tensorboard"


class Callback:
    """Base of ``fit``'s callbacks; every hook does nothing unless overridden."""

    #: the ``TrainConfig`` flag that asks for this callback (``fit`` refuses the flag without it)
    config_flag: ClassVar[str | None] = None

    def on_fit_start(self, model: PromptModel, train_set: Dataset, val_set: Dataset | None) -> None:
        """Once, before the first epoch to run."""

    def on_step(self, step: int, values: dict[str, float]) -> None:
        """After optimiser step ``step`` (from 1, counted over the run): ``{"loss": ..., "lr": ...}``."""

    def on_epoch_end(self, model: PromptModel, epoch: int) -> dict[str, Any]:
        """After epoch ``epoch`` (from 1) trained, before validation; returns columns for its log row."""
        return {}

    def on_row(self, epoch: int, row: dict[str, Any]) -> None:
        """The epoch's finished log row."""

    def close(self) -> None:
        """Training stopped (finished, failed or interrupted)."""


def check_requested(config: Any, callbacks: list[Callback]) -> None:
    """A config flag that asks for a callback (``log_nmi``) without that callback is a mistake, not a no-op."""
    given = {callback.config_flag for callback in callbacks}
    for flag in ("log_nmi",):
        if getattr(config, flag) and flag not in given:
            raise ConfigError(
                f"train.{flag}=True needs its callback: run through promptvit.experiment (promptvit train, "
                f"sweeps), which attaches it, or pass fit(callbacks=[...]) with one whose config_flag is '{flag}'"
            )


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """``log.csv``: one row per finished epoch, columns in order of first appearance (rewritten whole)."""
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    atomic_write_text(path, buffer.getvalue())


#: log.csv columns that are bookkeeping, not curves
_NOT_PLOTTED = frozenset({"epoch", "step", "seconds", "lr"})
_GROUPS = (("train_", "train/"), ("val_", "val/"), ("test_", "test/"), ("method_", "method/"), ("nmi_", "nmi/"))


def tensorboard_tag(column: str) -> str | None:
    """The TensorBoard tag of a ``log.csv`` column: grouped as ``train/``, ``val/``, ``method/``, ``nmi/``;
    None for bookkeeping (epoch, step, seconds; the learning rate is logged per step as ``lr``)."""
    if column in _NOT_PLOTTED:
        return None
    if column == "aux_loss":
        return "train/aux_loss"
    for prefix, group in _GROUPS:
        if column.startswith(prefix):
            return group + column.removeprefix(prefix)
    return column


def _summary_writer(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ConfigError("log_tensorboard=True needs the 'tensorboard' package (pip install tensorboard)") from error
    return SummaryWriter(str(run_dir / TENSORBOARD_DIR))


class TensorBoardLogger(Callback):
    """TensorBoard scalars under ``run_dir/tensorboard``: per optimiser step ``train/loss_step`` and ``lr``,
    per epoch the numeric columns of ``log.csv`` grouped by :func:`tensorboard_tag` (x axis: the epoch)."""

    config_flag = "log_tensorboard"

    def __init__(self, run_dir: Path) -> None:
        self.writer = _summary_writer(run_dir)

    def on_step(self, step: int, values: dict[str, float]) -> None:
        self.writer.add_scalar("train/loss_step", values["loss"], step)
        self.writer.add_scalar("lr", values["lr"], step)

    def on_row(self, epoch: int, row: dict[str, Any]) -> None:
        for key, value in row.items():
            tag = tensorboard_tag(key)
            if tag is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def log_test_scalars(run_dir: Path, metrics: dict[str, Any], epoch: int) -> None:
    """The test figures of a finished run as ``test/...`` scalars at its selected epoch (numbers only)."""
    writer = _summary_writer(run_dir)
    try:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"test/{key}", value, epoch)
    finally:
        writer.close()
