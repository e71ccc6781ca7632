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
    tags = {
        "train_loss": "train/loss",
        "val_accuracy": "val/accuracy",
        "val_loss": "val/loss",
        "method_loss_patch": "method/loss_patch",
        "method_beta": "method/beta",
    }
    for key, tag in tags.items():
        assert [step for step, _ in logged[tag]] == [1, 2], key
        # TensorBoard stores float32: compare with the CSV's float64 at that precision.
        assert [value for _, value in logged[tag]] == pytest.approx([float(r[key]) for r in rows], rel=1e-6)
    assert "method/mapping" not in logged  # text (the class -> prompt mapping) stays in log.csv only
    assert not {"epoch", "step", "seconds", "train/seconds"} & set(logged)  # bookkeeping is not a curve
    # per optimiser step (16 images, batch 8: 2 steps an epoch): the loss and the learning rate
    assert [step for step, _ in logged["train/loss_step"]] == [1, 2, 3, 4]
    assert [step for step, _ in logged["lr"]] == [1, 2, 3, 4]
    per_epoch = [sum(v for _, v in logged["train/loss_step"][i : i + 2]) / 2 for i in (0, 2)]
    assert per_epoch == pytest.approx([float(r["train_loss"]) for r in rows], rel=1e-5)  # equal batches
