"""Artifact files: what is written, and clear refusals of damaged or foreign folders."""

from __future__ import annotations

import json

import pytest
import torch

import promptvit
from promptvit.artifact import CONFIG_FILE, WEIGHTS_FILE, ArtifactError
from tests.conftest import build_tiny, tiny_input


@pytest.fixture
def saved(tmp_path):
    model = promptvit.wrap(build_tiny("vit_token"), "vpt", num_classes=4, prompt_length=2)
    return model, model.save_pretrained(tmp_path / "artifact")


def test_config_records_what_rebuilding_needs(saved) -> None:
    model, directory = saved
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config["method"] == "vpt" and config["method_config"]["prompt_length"] == 2
    assert config["base_model"]["name"] == "vit_tiny_patch16_224"
    assert config["base_model"]["kwargs"]["depth"] == 2 and config["num_classes"] == 4
    assert config["input_size"] == [3, 16, 16] and config["library_version"] == promptvit.__version__
    assert config["parameters"]["tuned"] == model.parameter_summary()["tuned"]


def test_rebuild_from_config_alone_is_exact(saved) -> None:
    model, directory = saved
    loaded = promptvit.load(directory).eval()  # random-init base rebuilt from the recorded seed
    with torch.no_grad():
        assert torch.equal(loaded(tiny_input("vit_token")), model.eval()(tiny_input("vit_token")))


def test_truncated_weights_are_refused(saved) -> None:
    _, directory = saved
    data = (directory / WEIGHTS_FILE).read_bytes()
    (directory / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        promptvit.load(directory, base_model=build_tiny("vit_token"))


def test_pickled_weights_are_not_loaded(tmp_path) -> None:
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ArtifactError, match="pickled weights are not loaded"):
        promptvit.load(tmp_path)


def test_damaged_or_foreign_config(saved) -> None:
    _, directory = saved
    (directory / CONFIG_FILE).write_text("{ not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        promptvit.load(directory)
    (directory / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ArtifactError, match="not written by promptvit"):
        promptvit.load(directory)


def test_unknown_option_in_config_is_named(saved) -> None:
    _, directory = saved
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["method_config"]["prompt_lenght"] = 3
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"adapter_config.json is damaged .*prompt_lenght"):
        promptvit.load(directory, base_model=build_tiny("vit_token"))


def test_print_trainable_parameters(capsys) -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "linear", num_classes=4)
    line = model.print_trainable_parameters()
    assert "tuned params 132" in line and line in capsys.readouterr().out


def edited(directory, **changes):
    config = json.loads((directory / CONFIG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"geometry": None}, "the 'geometry' entry is missing"),
        ({"format_version": "1"}, "format_version '1' is not a format number"),
        ({"base_fingerprint": 7}, "'base_fingerprint' entry is missing or not a string"),
        ({"multilabel": "no"}, "multilabel must be true or false"),
        ({"input_size": [3, 0, 16]}, "input_size must be [3, height, width]"),
        (
            {"data_config": {"input_size": [3, 16, 16], "std": [0.0, 0.0, 0.0]}},
            "data_config.std must be 3 finite",
        ),
        (
            {"data_config": {"input_size": [3, 16, 16], "mean": [float("nan")] * 3}},
            "data_config.mean must be 3 finite",
        ),
        (
            {"base_model": {"name": "x", "init_seed": "seven"}},
            "base_model.init_seed 'seven' is not an integer",
        ),
        (
            {"calibration": {"kind": "temperature", "temperature": 1e-300}},
            "calibration temperature 1e-300 is outside",
        ),
        (
            {"calibration": {"kind": "temperature", "temperature": float("inf")}},
            "calibration temperature inf",
        ),
        (
            {"calibration": {"kind": "platt", "scale": [1.0] * 4, "bias": [0.0, 0.0, 1e9, 0.0]}},
            "calibration bias",
        ),
        (
            {"thresholds": {"classes": {"class_1": {"threshold": 1.5}}}},
            "threshold of class 'class_1' must be a probability",
        ),
        ({"thresholds": {"classes": {"nobody": {"threshold": 0.5}}}}, "thresholds name the class 'nobody'"),
    ],
)
def test_every_stored_entry_is_checked_when_an_artifact_is_read(saved, changes, problem) -> None:
    _, directory = saved
    edited(directory, **changes)
    with pytest.raises(ArtifactError) as error:
        promptvit.load(directory)
    message = str(error.value)
    assert f"{directory / CONFIG_FILE} is damaged: " in message and problem in message
    assert "\n" not in message


def test_a_damaged_geometry_or_method_config_names_the_file(saved) -> None:
    _, directory = saved
    config = json.loads((directory / CONFIG_FILE).read_text())
    edited(directory, geometry={**config["geometry"], "depth": "2"})
    with pytest.raises(
        ArtifactError, match=r"adapter_config.json is damaged .*geometry depth must be of type int"
    ):
        promptvit.load(directory)


def test_predict_refuses_a_calibration_that_would_write_nan_probabilities(saved, tmp_path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from promptvit.cli import app

    _, directory = saved
    edited(directory, calibration={"kind": "temperature", "temperature": 1e-300, "fitted_on": "val"})
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    result = CliRunner().invoke(
        app, ["predict", str(directory), str(tmp_path / "x.png"), "--out", str(tmp_path / "p.csv")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "calibration temperature 1e-300 is outside" in " ".join(result.output.split())
    assert not (tmp_path / "p.csv").exists()


def test_moved_local_weights_tell_a_command_line_user_what_to_do(tmp_path) -> None:
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from promptvit.cli import app
    from tests.conftest import TINY_BACKBONES

    arch, options, _ = TINY_BACKBONES["vit_token"]
    save_file(build_tiny("vit_token", seed=9).state_dict(), str(tmp_path / "base.safetensors"))
    model = promptvit.wrap(
        promptvit.create_backbone(arch, weights=tmp_path / "base.safetensors", **options), "linear"
    )
    directory = model.save_pretrained(tmp_path / "artifact")
    (tmp_path / "base.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(
        app, ["predict", str(directory), str(tmp_path / "images"), "--out", str(tmp_path / "p.csv")]
    )
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "base_model=" not in flat
    assert (
        f"copy it back, or to {directory / 'base.safetensors'}, or set base_model.weights in that file"
        in flat
    )
    (tmp_path / "elsewhere.safetensors").rename(directory / "base.safetensors")  # beside the artifact
    with torch.no_grad():
        assert torch.equal(
            promptvit.load(directory).eval()(tiny_input("vit_token")), model.eval()(tiny_input("vit_token"))
        )
