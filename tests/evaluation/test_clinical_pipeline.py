"""The run pipeline's clinical hook: calibration fitted on validation only, stored in the artifact and
applied by eval/predict/serving; metrics.json and log.csv carry the probability metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from promptvit.artifact import ArtifactError, read_artifact_config, update_artifact_config
from promptvit.evaluation.calibration import Calibration
from tests.cli.test_cli import invoke, write_config, write_image_folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("clinical")
    data = write_image_folder(tmp / "data", classes=2, per_class=10)
    import promptvit.train.clinical as clinical

    seen_rows = []
    original = clinical.fit_calibration

    def recording(logits, targets, multilabel, **options):
        seen_rows.append(logits.shape[0])
        return original(logits, targets, multilabel, **options)

    clinical.fit_calibration = recording
    try:
        # two validation images per class: the checked default would keep T = 1 (tested below); these tests
        # are about how a fitted calibration travels, so it is applied
        config = write_config(tmp, data)
        raw = yaml.safe_load(config.read_text())
        raw["evaluation"] = {"calibration": "always"}
        config.write_text(yaml.safe_dump(raw))
        result = invoke("train", "--config", str(config), "--seed", "0")
    finally:
        clinical.fit_calibration = original
    assert result.exit_code == 0, result.output
    run = tmp / "runs" / "linear-3shot-seed0"
    return run, data, {"rows": seen_rows}


def test_metrics_json_and_log_carry_probability_metrics(trained_run) -> None:
    run, _, seen = trained_run
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    for key in ("nll", "brier", "ece", "ece_mass", "mce"):
        assert isinstance(test[key], float) and isinstance(test["calibrated"][key], float)
        assert isinstance(metrics["val"][key], float)
    assert seen["rows"] == [metrics["num_val"]]  # fitted once, on the validation rows only
    assert test["calibration"]["kind"] == "temperature"
    assert test["calibration"]["val_nll_after"] <= test["calibration"]["val_nll_before"]
    assert test["ci"]["low"] <= test["accuracy"] <= test["ci"]["high"]
    assert set(test["thresholds"]["classes"]["class_1"]) >= {"sensitivity", "specificity", "ppv", "npv"}
    with open(run / "log.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert {"val_ece", "val_nll", "val_brier", "val_ece_mass", "val_mce"} <= set(header)


def test_artifact_stores_calibration_and_thresholds(trained_run) -> None:
    run, _, _ = trained_run
    info = read_artifact_config(run / "artifact")
    calibration = Calibration.from_dict(info["calibration"], 2)
    assert calibration.temperature > 0
    assert info["thresholds"]["chosen_on"] == "val"


def test_eval_applies_the_stored_calibration_or_not(trained_run, tmp_path: Path) -> None:
    run, _, _ = trained_run
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    assert invoke("eval", str(run), "--out", str(tmp_path / "cal.json")).exit_code == 0
    assert invoke("eval", str(run), "--uncalibrated", "--out", str(tmp_path / "raw.json")).exit_code == 0
    cal, raw = (
        json.loads((tmp_path / "cal.json").read_text()),
        json.loads((tmp_path / "raw.json").read_text()),
    )
    assert cal["calibrated"] is True and raw["calibrated"] is False
    assert raw["nll"] == pytest.approx(metrics["nll"], abs=1e-6)
    assert cal["nll"] == pytest.approx(metrics["calibrated"]["nll"], abs=1e-6)
    assert cal["accuracy"] == pytest.approx(raw["accuracy"])  # temperature keeps the argmax
    assert cal["uncalibrated"]["ece"] == pytest.approx(raw["ece"], abs=1e-6)


def test_predict_uses_calibrated_probabilities_and_thresholds(trained_run, tmp_path: Path) -> None:
    run, data, _ = trained_run
    artifact = run / "artifact"
    for flag, name in (([], "cal.csv"), (["--uncalibrated"], "raw.csv")):
        result = invoke("predict", str(artifact), str(data / "class_1"), "--out", str(tmp_path / name), *flag)
        assert result.exit_code == 0, result.output
    read = {}
    for name in ("cal.csv", "raw.csv"):
        with open(tmp_path / name, newline="") as handle:
            read[name] = list(csv.DictReader(handle))
    info = read_artifact_config(artifact)
    t = info["calibration"]["temperature"]
    threshold = info["thresholds"]["classes"]["class_1"]["threshold"]
    for cal, raw in zip(read["cal.csv"], read["raw.csv"], strict=True):
        p0, p1 = float(raw["class_0"]), float(raw["class_1"])
        logit_gap = torch.log(torch.tensor(p1 / p0, dtype=torch.float64))  # z1 - z0
        expected = float(torch.sigmoid(logit_gap / t))
        assert float(cal["class_1"]) == pytest.approx(expected, abs=1e-4)
        if abs(float(cal["class_1"]) - threshold) > 1e-6:  # the CSV rounds to 6 decimals
            assert cal["prediction"] == ("class_1" if float(cal["class_1"]) > threshold else "class_0")


def test_serving_probabilities_apply_the_stored_calibration(trained_run) -> None:
    from promptvit.serving import MultiTaskModel

    run, _, _ = trained_run
    served = MultiTaskModel(_plain(run), [run / "artifact"])
    images = torch.randn(3, 3, 16, 16)
    logits = served(images)["artifact"]
    t = read_artifact_config(run / "artifact")["calibration"]["temperature"]
    assert torch.allclose(served.probabilities(images)["artifact"], (logits / t).softmax(-1))
    assert torch.allclose(served.probabilities(images, calibrated=False)["artifact"], logits.softmax(-1))


def _plain(run: Path):
    from promptvit.backbones import create_backbone

    options = yaml.safe_load((run / "config.yaml").read_text())["backbone"]["options"]
    return create_backbone("vit_tiny_patch16_224", **options)


def test_damaged_calibration_entry_is_a_clear_error(trained_run, tmp_path: Path) -> None:
    import shutil

    run, data, _ = trained_run
    copy = tmp_path / "artifact"
    shutil.copytree(run / "artifact", copy)
    update_artifact_config(copy, calibration={"kind": "temperature", "temperature": 0})
    result = invoke("predict", str(copy), str(data / "class_1"), "--out", str(tmp_path / "p.csv"))
    assert result.exit_code != 0 and "calibration" in result.output and "Traceback" not in result.output
    from promptvit.evaluation.calibration import artifact_calibration

    with pytest.raises(ArtifactError, match="damaged"):
        artifact_calibration(read_artifact_config(copy), copy)


def test_the_evaluation_section_sets_bins_threshold_rule_and_interval(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", classes=2, per_class=10)
    config = write_config(tmp_path, data)
    raw = yaml.safe_load(config.read_text())
    raw["evaluation"] = {
        "ece_bins": 4,
        "threshold_rule": "sensitivity",
        "target_sensitivity": 1.0,
        "bootstrap_resamples": 200,
        "ci_level": 0.8,
    }
    config.write_text(yaml.safe_dump(raw))
    result = invoke("train", "--config", str(config), "--seed", "0")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "linear-3shot-seed0"
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert len(test["reliability"]["counts"]) == 4 and len(test["calibrated"]["reliability"]["counts"]) == 4
    assert test["thresholds"]["rule"] == "sensitivity"
    assert read_artifact_config(run / "artifact")["thresholds"]["target_sensitivity"] == 1.0
    assert test["ci"]["level"] == 0.8 and test["ci"]["resamples"] == 200
    # `eval --bins` rescores with other bins; the ECE of one bin is |mean confidence - accuracy|
    assert invoke("eval", str(run), "--uncalibrated", "--bins", "1", "--out", str(tmp_path / "one.json")).exit_code == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["ece"] == pytest.approx(one["mce"])
    bad = invoke("train", "--config", str(config), "--seed", "1", "--evaluation.ece-bins", "0")
    assert bad.exit_code != 0 and "ece_bins" in bad.output and "Traceback" not in bad.output


def test_calibration_on_two_images_per_class_keeps_t_1_with_a_warning(tmp_path: Path, caplog) -> None:
    """The default (checked) calibration on a 2-per-class validation set: T = 1, a warning, applied: false in
    metrics.json and in the artifact; eval then scores the raw probabilities and says why."""
    data = write_image_folder(tmp_path / "data", classes=2, per_class=10)
    with caplog.at_level("WARNING", logger="promptvit"):
        result = invoke("train", "--config", str(write_config(tmp_path, data)), "--seed", "0")
    assert result.exit_code == 0, result.output
    assert any("calibration not applied" in r.getMessage() for r in caplog.records)
    run = tmp_path / "runs" / "linear-3shot-seed0"
    test = json.loads((run / "metrics.json").read_text())["test"]
    stored = read_artifact_config(run / "artifact")["calibration"]
    for entry in (test["calibration"], stored):
        assert entry["temperature"] == 1.0 and entry["applied"] is False
        assert "2 images in its smallest class" in entry["reason"]
    assert test["calibrated"]["nll"] == pytest.approx(test["nll"])  # the identity
    evaluated = invoke("eval", str(run), "--json")
    assert json.loads(evaluated.output)["calibrated"] is False
    shown = invoke("eval", str(run))
    assert "not applied" in shown.output and "sensitivity" in shown.output


def test_a_temperature_at_its_bound_is_not_applied() -> None:
    from promptvit.evaluation.calibration import fit_calibration

    targets = torch.arange(40) % 2
    logits = torch.zeros(40, 2)
    logits[torch.arange(40), targets] = 0.01  # almost no signal but always right: T runs to its lower bound
    checked = fit_calibration(logits, targets, False)
    assert not checked.applied and checked.temperature == 1.0 and "bound" in checked.reason
    assert checked.fitted["temperature"] == pytest.approx(0.05, rel=0.02)
    forced = fit_calibration(logits, targets, False, checked=False)
    assert forced.applied and forced.temperature == pytest.approx(0.05, rel=0.02)
