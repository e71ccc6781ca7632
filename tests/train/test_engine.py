"""fit / evaluate / predict_scores on tiny models and synthetic data."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import promptvit
from promptvit.methods.base import ConfigError
from promptvit.train import (
    FitResult,
    ResumeError,
    TrainConfig,
    TrainingError,
    classification_loss,
    engine,
    evaluate,
    fit,
    predict_scores,
)
from tests.conftest import build_tiny
from tests.train.helpers import CLASSES, PoisonAfter, multi_label_set, single_label_set, tiny_model

QUIET = dict(progress=False)


def _fit(model, train, val, run_dir: Path, **options) -> FitResult:
    fit_options = {
        k: options.pop(k) for k in ("resume", "fingerprint", "extra_artifact_info") if k in options
    }
    cfg = TrainConfig(**{"epochs": 3, "lr": 0.05, **QUIET, **options})
    return fit(
        model, train, val, config=cfg, run_dir=run_dir, multilabel=False, class_names=CLASSES, **fit_options
    )


def _without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_linear_probe_learns_a_separable_task(tmp_path: Path) -> None:
    train, val = single_label_set(32, seed=1, strength=1.0), single_label_set(32, seed=2, strength=1.0)
    model = tiny_model("linear")
    before = evaluate(model, val, multilabel=False, class_names=CLASSES)["accuracy"]
    result = _fit(model, train, val, tmp_path, epochs=4)
    after = evaluate(model, val, multilabel=False, class_names=CLASSES)["accuracy"]
    assert after == result.best_metric  # the model holds the selected epoch's state
    assert after >= 75.0 > before + 20
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_run_folder_layout_and_artifact_round_trip(tmp_path: Path) -> None:
    train, val = single_label_set(12, seed=1), single_label_set(8, seed=2)
    model = tiny_model("bias")
    result = _fit(model, train, val, tmp_path, extra_artifact_info={"dataset": "colours"})
    assert result.run_dir == tmp_path and result.artifact_dir == tmp_path / "artifact"
    rows = list(csv.DictReader((tmp_path / "log.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["step"]) for r in rows] == [3, 6, 9]
    assert {"train_loss", "lr", "seconds", "val_accuracy", "val_auc", "val_loss"} <= set(rows[0])
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["best_epoch"] == result.best_epoch
    assert summary["val"]["accuracy"] == result.best_metric
    assert summary["parameters"] == model.parameter_summary()
    assert summary["timing"]["total_seconds"] > 0
    checkpoint = tmp_path / "checkpoint"
    assert {p.name for p in checkpoint.iterdir()} == {"checkpoint.json", "tensors-000004.safetensors"}
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.pt"))
    config = json.loads((tmp_path / "artifact" / "adapter_config.json").read_text())
    assert config["class_names"] == CLASSES and config["multilabel"] is False
    assert config["dataset"] == "colours" and "accuracy" in config["selection"]
    loaded = promptvit.load(tmp_path / "artifact", base_model=build_tiny("vit_token", num_classes=4))
    assert torch.equal(
        predict_scores(loaded, val, multilabel=False), predict_scores(model, val, multilabel=False)
    )


def test_selection_keeps_the_best_validation_epoch_and_ties_go_earlier(tmp_path: Path, monkeypatch) -> None:
    values = iter([50.0, 80.0, 80.0, 60.0])
    states = []

    def fake_evaluate(model, dataset, **kwargs):
        states.append({k: v.clone() for k, v in model.tuned_state_dict().items()})
        return {"accuracy": next(values), "loss": 1.0}

    monkeypatch.setattr(engine, "evaluate", fake_evaluate)
    model = tiny_model("linear")
    result = _fit(model, single_label_set(8, 1), single_label_set(4, 2), tmp_path, epochs=4)
    assert (result.best_epoch, result.best_metric) == (2, 80.0)
    assert result.selection == "val accuracy (best at epoch 2 of 4)"
    assert [row["val_accuracy"] for row in result.history] == [50.0, 80.0, 80.0, 60.0]
    assert not torch.equal(states[1]["backbone.head.weight"], states[3]["backbone.head.weight"])
    final = model.tuned_state_dict()
    saved = load_file(tmp_path / "artifact" / "adapter_model.safetensors")
    for name, tensor in states[1].items():
        assert torch.equal(final[name], tensor)
        assert torch.equal(saved[name], tensor)


def test_selection_on_loss_picks_the_lowest(tmp_path: Path, monkeypatch) -> None:
    losses = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: {"accuracy": 10.0, "loss": next(losses)})
    result = _fit(
        tiny_model(), single_label_set(8, 1), single_label_set(4, 2), tmp_path, select_metric="loss"
    )
    assert (result.best_epoch, result.best_metric) == (2, 1.0)


def test_eval_every_validates_on_schedule_and_at_the_last_epoch(tmp_path: Path) -> None:
    result = _fit(
        tiny_model(), single_label_set(8, 1), single_label_set(4, 2), tmp_path, epochs=5, eval_every=2
    )
    assert ["val_accuracy" in row for row in result.history] == [False, True, False, True, True]


def test_without_validation_the_last_epoch_is_kept(tmp_path: Path) -> None:
    model = tiny_model()
    result = _fit(model, single_label_set(8, 1), None, tmp_path)
    assert (result.best_epoch, result.best_metric) == (3, None)
    assert result.selection == "last epoch (no validation set)"
    saved = load_file(tmp_path / "artifact" / "adapter_model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.tuned_state_dict().items())


def test_select_metric_of_the_other_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="map"):
        _fit(tiny_model(), single_label_set(8, 1), single_label_set(4, 2), tmp_path, select_metric="map")


def _resume_setup(tmp_path: Path):
    train, val = single_label_set(26, seed=1), single_label_set(12, seed=2)  # 26: a partial last batch
    options = dict(epochs=4, warmup_epochs=1, lr=0.05, min_lr=1e-3, weight_decay=1e-3, seed=3)
    return train, val, options


def test_resume_after_interruption_is_bit_identical(tmp_path: Path, monkeypatch) -> None:
    train, val, options = _resume_setup(tmp_path)
    straight_model = tiny_model("bias")
    straight = _fit(straight_model, train, val, tmp_path / "a", **options)

    interrupted = tiny_model("bias")

    def crash(model, epoch):
        if epoch == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(interrupted.method, "on_epoch_end", crash)
    with pytest.raises(KeyboardInterrupt):
        _fit(interrupted, train, val, tmp_path / "b", **options)
    meta = json.loads((tmp_path / "b" / "checkpoint" / "checkpoint.json").read_text())
    assert (meta["epoch"], meta["finished"]) == (2, False)

    resumed_model = tiny_model("bias")
    with torch.no_grad():
        resumed_model.get_classifier().weight.add_(1.0)  # a different start: the checkpoint must overwrite it
    resumed = _fit(resumed_model, train, val, tmp_path / "b", **options)

    assert _without_time(resumed.history) == _without_time(straight.history)
    assert (resumed.best_epoch, resumed.best_metric, resumed.selection) == (
        straight.best_epoch,
        straight.best_metric,
        straight.selection,
    )
    a, b = straight_model.tuned_state_dict(), resumed_model.tuned_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the same seed without interruption gives the same run again
    again = _fit(tiny_model("bias"), train, val, tmp_path / "c", **options)
    assert _without_time(again.history) == _without_time(straight.history)


def test_fp16_loss_scale_state_survives_a_resume(tmp_path: Path, monkeypatch) -> None:
    """The gradient scaler (fp16 on CUDA) is checkpointed: a resumed run ends with the same scaler state.

    Forced on CPU: ``_autocast_for`` reports fp16 without autocasting, so the engine builds its scaler.
    """
    monkeypatch.setattr(engine, "_autocast_for", lambda *a, **k: (contextlib.nullcontext, torch.float16))
    train, val, options = _resume_setup(tmp_path)
    options.update(precision="fp16")
    _fit(tiny_model("bias"), train, val, tmp_path / "a", **options)
    interrupted = tiny_model("bias")

    def crash(model, epoch):
        if epoch == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(interrupted.method, "on_epoch_end", crash)
    with pytest.raises(KeyboardInterrupt):
        _fit(interrupted, train, val, tmp_path / "b", **options)
    _fit(tiny_model("bias"), train, val, tmp_path / "b", **options)

    def scaler_state(run: str) -> dict:
        return json.loads((tmp_path / run / "checkpoint" / "checkpoint.json").read_text())["grad_scaler"]

    straight = scaler_state("a")
    assert straight["_growth_tracker"] > 0  # steps since the last scale change: what a restart would lose
    assert scaler_state("b") == straight


def test_a_finished_run_is_returned_without_training(tmp_path: Path, monkeypatch) -> None:
    train, val = single_label_set(8, 1), single_label_set(4, 2)
    first_model = tiny_model()
    first = _fit(first_model, train, val, tmp_path)
    monkeypatch.setattr(engine, "_train_epoch", lambda *a, **k: pytest.fail("trained again"))
    model = tiny_model(seed=0)
    with torch.no_grad():
        model.get_classifier().weight.zero_()
    again = _fit(model, train, val, tmp_path)
    assert (again.best_epoch, again.best_metric, again.selection) == (
        first.best_epoch,
        first.best_metric,
        first.selection,
    )
    assert _without_time(again.history) == _without_time(first.history)
    assert torch.equal(model.get_classifier().weight, first_model.get_classifier().weight)


def test_resuming_with_another_setup_names_the_differences(tmp_path: Path) -> None:
    train, val = single_label_set(8, 1), single_label_set(4, 2)
    _fit(tiny_model(), train, val, tmp_path, epochs=1, fingerprint={"dataset": "colours-v1"})
    with pytest.raises(ResumeError, match=r"\['epochs', 'lr'\]"):
        _fit(tiny_model(), train, val, tmp_path, epochs=2, lr=0.1, fingerprint={"dataset": "colours-v1"})
    with pytest.raises(ResumeError, match="dataset.*colours-v1.*colours-v2"):
        _fit(tiny_model(), train, val, tmp_path, epochs=1, fingerprint={"dataset": "colours-v2"})
    with pytest.raises(ResumeError, match="method"):
        _fit(tiny_model("bias"), train, val, tmp_path, epochs=1, fingerprint={"dataset": "colours-v1"})
    # operational options may change; resume=False starts over
    _fit(
        tiny_model(), train, val, tmp_path, epochs=1, fingerprint={"dataset": "colours-v1"}, eval_batch_size=3
    )
    result = _fit(tiny_model(), train, val, tmp_path, epochs=2, resume=False)
    assert len(result.history) == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    train, val = single_label_set(12, 1), single_label_set(4, 2)
    options = dict(epochs=3, lr=0.05)
    reference = tiny_model()
    after_epoch_1 = {}

    def record(model, epoch):
        if epoch == 1:
            after_epoch_1.update({k: v.clone() for k, v in model.tuned_state_dict().items()})
        return {}

    monkeypatch.setattr(reference.method, "on_epoch_end", record)
    _fit(reference, train, val, tmp_path / "ref", **options)

    poisoned = PoisonAfter(train, limit=len(train) + 5)  # fine for epoch 1, NaN images in epoch 2
    with pytest.raises(TrainingError, match=r"epoch 2, optimiser step 5 .*input batch contains NaN"):
        _fit(tiny_model(), poisoned, val, tmp_path / "run", **options)
    checkpoint = tmp_path / "run" / "checkpoint"
    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    assert meta["epoch"] == 1 and len(meta["history"]) == 1
    tensors = load_file(checkpoint / meta["tensors_file"])
    for name, tensor in after_epoch_1.items():
        assert torch.equal(tensors[f"model/{name}"], tensor)
    assert not (tmp_path / "run" / "metrics.json").exists()
    # the run can go on from that checkpoint once the data is fixed
    result = _fit(tiny_model(), train, val, tmp_path / "run", **options)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]


def test_a_diverging_lr_is_reported(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="learning rate is too high"):
        _fit(tiny_model("full"), single_label_set(8, 1), None, tmp_path, lr=1e30, epochs=2)


def test_multilabel_fit_uses_bce_and_map(tmp_path: Path) -> None:
    train, val = multi_label_set(24, seed=1), multi_label_set(16, seed=2, absent=2)
    names = ["r", "g", "b"]
    model = tiny_model("linear", num_classes=3)
    cfg = TrainConfig(epochs=4, lr=0.05, **QUIET)
    result = fit(model, train, val, config=cfg, run_dir=tmp_path, multilabel=True, class_names=names)
    assert "map" in result.selection
    metrics = evaluate(model, val, multilabel=True, class_names=names)
    assert metrics["map"] == result.best_metric == result.val_metrics["map"]
    assert metrics["per_class_ap"]["b"] == 0.0 and metrics["auc_skipped"] == ["b"]
    assert metrics["map"] == pytest.approx(metrics["map_present"] * 2 / 3)
    assert metrics["map_present"] > 80
    logits = torch.logit(predict_scores(model, val, multilabel=True).double()).float()
    targets = torch.stack([t for _, t in val])
    assert metrics["loss"] == pytest.approx(float(classification_loss(logits, targets, True)), rel=1e-4)
    config = json.loads((tmp_path / "artifact" / "adapter_config.json").read_text())
    assert config["multilabel"] is True


def test_method_hooks_are_called(tmp_path: Path, monkeypatch) -> None:
    train = single_label_set(10, 1)
    model = tiny_model()
    seen = []

    def init(m, batches):
        for images, targets in batches:
            assert isinstance(images, torch.Tensor) and images.shape[1:] == (3, 16, 16)
            assert targets.shape == (images.shape[0],) and targets.dtype == torch.long
            seen.append(images.shape[0])
        return {"tokens": torch.tensor(2.5)}

    monkeypatch.setattr(model.method, "needs_data_init", True, raising=False)
    monkeypatch.setattr(model.method, "initialize_from_data", init)
    monkeypatch.setattr(
        model.method, "auxiliary_loss", lambda m, t: 0.1 * m.get_classifier().weight.square().sum()
    )
    monkeypatch.setattr(model.method, "on_epoch_end", lambda m, epoch: {"epoch_seen": epoch})
    result = _fit(model, train, None, tmp_path, epochs=2)
    assert sum(seen) == len(train)
    assert [row["method_epoch_seen"] for row in result.history] == [1, 2]
    assert all(row["aux_loss"] > 0 for row in result.history)
    assert json.loads((tmp_path / "metrics.json").read_text())["data_init"] == {"tokens": 2.5}


def test_max_steps_overrides_epochs(tmp_path: Path) -> None:
    result = _fit(
        tiny_model(), single_label_set(8, 1), single_label_set(4, 2), tmp_path, epochs=20, max_steps=5
    )
    assert [(row["epoch"], row["step"]) for row in result.history] == [(1, 2), (2, 4), (3, 5)]
    assert "val_accuracy" in result.history[-1]


def test_evaluate_and_predict_restore_the_mode_and_give_probabilities() -> None:
    model = tiny_model("bias")
    model.train()
    val = single_label_set(6, 2)
    scores = predict_scores(model, torch.utils.data.DataLoader(val, batch_size=4), multilabel=False)
    assert scores.shape == (6, 4) and torch.allclose(scores.sum(dim=1), torch.ones(6))
    assert model.training and not model.backbone.training  # frozen parts stay in eval mode
    metrics = evaluate(model, val, multilabel=False, class_names=CLASSES, batch_size=4)
    assert model.training
    assert metrics["num_samples"] == 6 and 0 <= metrics["accuracy"] <= 100
    images_only = torch.stack([image for image, _ in val])
    # one batch of 6 against batches of 4 and 2: the same scores up to float rounding
    torch.testing.assert_close(predict_scores(model, images_only, multilabel=False), scores)


def test_progress_bar_and_dict_config(tmp_path: Path, capsys, monkeypatch) -> None:
    # The bar is drawn on a terminal only (silent in logs and CI), so pretend stderr is one.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    result = fit(
        tiny_model(),
        single_label_set(8, 1),
        single_label_set(4, 2),
        config={"epochs": 1, "lr": 0.05, "progress": True},
        run_dir=tmp_path,
        multilabel=False,
        class_names=CLASSES,
    )
    assert result.best_epoch == 1
    assert "epoch 1/1" in capsys.readouterr().err
