"""TensorBoard logging: every per-epoch number of log.csv, the method's own values included."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import promptvit
from promptvit.train import TrainConfig, fit
from tests.conftest import build_tiny
from tests.train.helpers import CLASSES, single_label_set

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_epoch_metrics_and_the_methods_values(tmp_path: Path) -> None:
    # DA-VPT reports its own numbers each epoch (loss terms, mapping changes, its weights).
    model = promptvit.wrap(build_tiny("vit_token", num_classes=4), "da_vpt", prompt_length=2, num_proxy_prompts=2)
    config = TrainConfig(epochs=2, batch_size=8, lr=0.01, progress=False, log_tensorboard=True)
    fit(
        model,
        single_label_set(16, seed=1),
        single_label_set(8, seed=2),
        config=config,
        run_dir=tmp_path,
        multilabel=False,
        class_names=CLASSES,
    )
    logged = scalars(tmp_path / "tensorboard")
    with open(tmp_path / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for key in ("train_loss", "val_accuracy", "val_loss", "lr", "method_loss_patch", "method_beta"):
        assert [step for step, _ in logged[key]] == [1, 2], key
        # TensorBoard stores float32: compare with the CSV's float64 at that precision.
        assert [value for _, value in logged[key]] == pytest.approx([float(r[key]) for r in rows], rel=1e-6)
    assert "method_mapping" not in logged  # text (the class -> prompt mapping) stays in log.csv only
