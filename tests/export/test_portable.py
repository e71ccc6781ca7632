"""What leaves this machine: no uploaded or exported file names one of its paths, and every export states the
input size the model was trained at, as timm's ``resolve_data_config`` reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from promptvit.cli import app
from tests.cli.test_cli import write_image_folder
from tests.export.test_round_trips import ARCH

runner = CliRunner()
VIT = {"img_size": 24, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def train(tmp: Path, backbone: dict, method: str) -> Path:
    data = write_image_folder(tmp / "data", classes=2, per_class=4)
    config = {
        "backbone": backbone,
        "method": {"name": method, "options": {"rank": 2} if method == "lora" else {}},
        "data": {"kind": "folder", "path": str(data), "shots": 2, "test_fraction": 0.25, "val_per_class": 1},
        "train": {"epochs": 1, "batch_size": 4, "optimizer": "adamw", "lr": 0.05, "progress": False},
        "output_dir": str(tmp / "runs"),
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", "--config", str(tmp / "config.yaml"), "--name", "run"])
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "run"


def export_all(run: Path, out: Path, formats: list[str]) -> dict[str, Path]:
    folders = {}
    for format in formats:
        folders[format] = out / format
        result = runner.invoke(app, ["export", str(run), "--format", format, "--out", str(folders[format])])
        assert result.exit_code == 0, result.output
    return folders


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A LoRA run on a ViT built for 24 px from a local weights file (an absolute path in its config)."""
    tmp = tmp_path_factory.mktemp("portable")
    save_file(timm.create_model(ARCH, **VIT).state_dict(), str(tmp / "base weights.safetensors"))
    return train(
        tmp, {"name": ARCH, "options": VIT, "weights": str(tmp / "base weights.safetensors")}, "lora"
    )


def test_no_uploaded_or_exported_file_names_a_path_of_this_machine(tmp_path, lora_run, fake_hub):
    result = runner.invoke(app, ["push", str(lora_run), "--repo", "org/portable"])
    assert result.exit_code == 0, result.output
    folders = export_all(lora_run, tmp_path / "exports", ["peft", "merged-timm", "onnx"])
    written = [p for p in (tmp_path / "remote").rglob("*") if p.is_file()]
    written += [p for folder in folders.values() for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {
        "README.md",
        "adapter_config.json",
        "config.json",
        "model.onnx",
        "export.json",
    }
    machine = {
        str(lora_run.parent.parent),
        str(Path.home()),
        str(Path.cwd()),
        str(Path(timm.__file__).parent),
    }
    assert all(len(path) > 4 for path in machine)
    for path in written:
        content = path.read_bytes()
        for local in machine:
            assert local.encode() not in content, f"{path.name} names {local}"
    # The names survive where a reader needs them.
    card = (tmp_path / "remote" / "org" / "portable" / "README.md").read_text()
    assert "`base weights.safetensors`" in card
    record = json.loads((tmp_path / "remote" / "org" / "portable" / "adapter_config.json").read_text())
    assert record["base_model"]["weights"] == "base weights.safetensors"


def test_resolve_data_config_on_every_export_gives_the_trained_input_size(tmp_path, lora_run):
    from timm.data import resolve_data_config

    # A CNN trained at 40 px (timm's config says 224) and a ViT built for 24 px.
    cnn = train(tmp_path / "cnn", {"name": "resnet10t", "image_size": 40}, "bias")
    artifact = json.loads((cnn / "artifact" / "adapter_config.json").read_text())
    assert artifact["input_size"] == artifact["data_config"]["input_size"] == [3, 40, 40]
    for run, size, formats in (
        (cnn, 40, ["merged-timm", "onnx"]),
        (lora_run, 24, ["peft", "merged-timm", "onnx"]),
    ):
        folders = export_all(run, tmp_path / run.parent.parent.name / "exports", formats)
        for format, folder in folders.items():
            record = json.loads((folder / "export.json").read_text())
            assert record["input_size"] == [3, size, size]
            assert tuple(resolve_data_config(pretrained_cfg=record["data_config"])["input_size"]) == (
                3,
                size,
                size,
            )
            if format == "merged-timm":  # timm's own loader reads config.json
                model = timm.create_model(f"local-dir:{folder}", pretrained=True)
                assert resolve_data_config(model=model)["input_size"] == (3, size, size)
                config = json.loads((folder / "config.json").read_text())
                assert config["label_names"] == ["class_0", "class_1"]
                assert (
                    config["pretrained_cfg"]["license"] == "unknown"
                )  # random or local weights: no timm licence
                assert "tag" not in config["pretrained_cfg"]
            if format == "onnx":
                import onnx

                dims = onnx.load(str(folder / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
                assert [d.dim_value for d in dims][1:] == [3, size, size]
            if format == "peft":
                assert f"[3, {size}, {size}]" in (folder / "README.md").read_text()
