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
