"""Sweep runs go through the same run pipeline as ``promptvit train`` (``experiment.run_pipeline``).

Before they shared it, sweep runs scored without the prefix cache and the precision, wrote no
``skipped_files.txt`` and read the environment twice; these tests pin each of those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import promptvit
from promptvit import experiment
from promptvit.protocols.runner import execute
from promptvit.protocols.spec import RunSpec
from promptvit.protocols.splits import materialise
from promptvit.run_config import RunConfig
from tests.conftest import build_tiny
from tests.protocols.helpers import tiny_base, write_image_folder


def _spec(data: Path, evaluate_on: str = "test", method: str = "linear", **train: Any) -> RunSpec:
    base = tiny_base(epochs=1, **train)
    config = RunConfig.model_validate(
        {
            **base,
            "method": {"name": method},
            "data": {"path": str(data), "val_per_class": 2, "test_fraction": 0.3, "skip_corrupt": True},
        }
    )
    return RunSpec(
        protocol="fewshot",
        task="folder",
        split="draw 0",
        seed=0,
        method=method,
        config=config,
        evaluate_on=evaluate_on,
        augment=False,
    )


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    root = write_image_folder(tmp_path / "data", classes=2, per_class=8)
    (root / "class_0" / "broken.png").write_bytes(b"not an image")
    return root


def test_a_sweep_run_uses_the_cache_the_precision_and_records_skipped_files(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    real_test = experiment.test_with_calibration

    def recording_test(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return real_test(*args, **kwargs)

    monkeypatch.setattr(experiment, "test_with_calibration", recording_test)
    versions: list[int] = []
    real_environment = experiment.environment
    monkeypatch.setattr(experiment, "environment", lambda: versions.append(1) or real_environment())

    spec = _spec(data, cache_prefix=True)
    body = execute(spec, tmp_path / "run", versions={"promptvit": "given"})

    assert len(calls) == 1  # the test split, once
    assert calls[0]["prefix_cache"] is not None and calls[0]["precision"] == spec.config.train.precision
    assert "broken.png" in (tmp_path / "run" / "skipped_files.txt").read_text()
    assert not versions, "the environment passed in is the one recorded; it is not read again"
    artifact = promptvit.artifact.read_artifact_config(tmp_path / "run" / "artifact")
    assert artifact["environment"] == {"promptvit": "given"}
    assert body["evaluated_on"] == "test" and body["metric"] == "accuracy"


def test_a_search_run_never_builds_a_dataset_of_the_test_images(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []
    real_dataset = experiment.ImageDataset

    def recording_dataset(samples: Any, *args: Any) -> Any:
        built.append(samples.source)
        return real_dataset(samples, *args)

    monkeypatch.setattr(experiment, "ImageDataset", recording_dataset)
    spec = _spec(data, evaluate_on="val")
    split = materialise(spec)
    body = execute(spec, tmp_path / "run")
    assert body["evaluated_on"] == "val"
    assert built == [split.train.source, split.val.source]


def test_the_pipeline_attaches_the_nmi_logger_that_log_nmi_asks_for(data: Path, tmp_path: Path) -> None:
    execute(_spec(data, method="vpt", log_nmi=True), tmp_path / "run")
    header = (tmp_path / "run" / "log.csv").read_text().splitlines()[0].split(",")
    assert {"nmi_block0", "nmi_block1"} <= set(header)


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        ("vpt", {"deep": True}, 2),
        ("vpt", {"deep": False}, 1),
        ("spt", {"deep": False}, 1),
        ("spt", {"deep": True}, 2),
        ("lora", {"layers": [1]}, 1),
        ("lora", {}, 2),
        ("linear", {}, None),
    ],
)
def test_prompted_depth_is_asked_of_the_method(method: str, options: dict, expected: int | None) -> None:
    model = promptvit.wrap(build_tiny("vit_token"), method, num_classes=2, **options)
    assert model.geometry.depth == 2
    assert model.method.prompted_depth(model.config, model.geometry.depth) == expected


@pytest.mark.parametrize(
    ("method", "options", "augmented"),
    [("linear", {"solver": "sgd"}, True), ("linear", {}, False), ("linear", {"solver": "lbfgs"}, False)],
)
def test_a_probe_fitted_to_convergence_sees_its_training_images_unaugmented(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, options: dict, augmented: bool
) -> None:
    train_flags: list[bool] = []
    real_transforms = experiment.build_transforms

    def recording_transforms(*args: Any, train: bool = False, **kwargs: Any) -> Any:
        train_flags.append(train)
        return real_transforms(*args, train=train, **kwargs)

    monkeypatch.setattr(experiment, "build_transforms", recording_transforms)
    spec = _spec(data, method=method)
    config = spec.config.model_copy(update={"method": spec.config.method.model_copy(update={"options": options})})
    execute(spec.model_copy(update={"config": config, "augment": True}), tmp_path / "run")
    assert any(train_flags) is augmented
