"""End-to-end command-line tests on tiny generated data and a tiny random ViT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from promptvit.cli import app
from promptvit.cli.overrides import apply_overrides, parse_extra_args

runner = CliRunner()

TINY_VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def write_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 20) -> Path:
    """Class c images are bright in horizontal band c, so even a tiny model can learn them."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            band = size // classes
            pixels[c * band : (c + 1) * band] += 180
            Image.fromarray(pixels).save(root / f"class_{c}" / f"img {i}.png")
    return root


def write_config(tmp_path: Path, data_root: Path, method: str = "linear", **train) -> Path:
    config = {
        "backbone": {"name": "vit_tiny_patch16_224", "options": TINY_VIT},
        "method": {"name": method},
        "data": {
            "kind": "folder",
            "path": str(data_root),
            "shots": 3,
            "test_fraction": 0.25,
            "val_per_class": 2,
        },
        "train": {"epochs": 2, "batch_size": 4, "optimizer": "adamw", "lr": 0.01, "progress": False, **train},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result


def test_overrides_parse_types_and_route_method_options() -> None:
    extra = parse_extra_args(["--method.prompt-length", "100", "--train.lr=0.01", "--method.deep", "false"])
    assert extra == {"method.prompt_length": 100, "train.lr": 0.01, "method.deep": False}
    config = apply_overrides({"method": {"name": "vpt"}}, extra)
    assert config["method"] == {"name": "vpt", "options": {"prompt_length": 100, "deep": False}}
    assert config["train"] == {"lr": 0.01}


def test_train_eval_predict_end_to_end(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data")
    config = write_config(tmp_path, data)
    result = invoke("train", "--config", str(config), "--method", "bias", "--seed", "1", "--train.lr", "0.02")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "bias-3shot-seed1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_train"] == 9 and metrics["test"]["accuracy"] >= 0
    assert (run / "artifact" / "adapter_model.safetensors").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"]["name"] == "bias" and saved["train"]["lr"] == 0.02

    result = invoke("eval", str(run), "--out", str(tmp_path / "eval.json"))
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(metrics["test"]["accuracy"])

    result = invoke("predict", str(run / "artifact"), str(data / "class_1"), "--out", str(tmp_path / "p.csv"))
    assert result.exit_code == 0, result.output
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and set(rows[0]) == {"file", "class_0", "class_1", "class_2", "prediction"}
    assert all(abs(sum(float(r[f"class_{c}"]) for c in range(3)) - 1) < 1e-4 for r in rows)


def test_unknown_config_key_is_one_line_error(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data")
    config = write_config(tmp_path, data)
    result = invoke("train", "--config", str(config), "--train.learning-rate", "0.1")
    assert result.exit_code == 2
    assert "train.learning_rate" in result.output and "Traceback" not in result.output


def test_unknown_method_option_names_the_option(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data")
    config = write_config(tmp_path, data)
    result = invoke("train", "--config", str(config), "--method", "partial", "--method.blocks", "1")
    assert result.exit_code == 2
    assert "blocks" in result.output and "num_blocks" in result.output


def test_missing_data_folder_is_clear(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "nowhere")
    result = invoke("train", "--config", str(config))
    assert result.exit_code == 2
    assert "nowhere" in result.output


def test_methods_lists_every_registered_method() -> None:
    import promptvit

    result = runner.invoke(app, ["methods"], terminal_width=250)
    assert result.exit_code == 0
    for name in promptvit.available_methods():
        assert name in result.output


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load_file

    import promptvit

    data = write_image_folder(tmp_path / "data")
    config = write_config(tmp_path, data, epochs=3)
    args = ["train", "--config", str(config), "--method", "bias"]
    assert invoke(*args, "--name", "straight").exit_code == 0

    bias = promptvit.get_method("bias")

    def interrupt(self, model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # as if the job were killed after epoch 2's checkpoint
        return {}

    monkeypatch.setattr(bias, "on_epoch_end", interrupt)
    interrupted = invoke(*args, "--name", "resumed")
    assert interrupted.exit_code != 0
    monkeypatch.undo()
    assert invoke(*args, "--name", "resumed").exit_code == 0

    runs = tmp_path / "runs"
    straight, resumed = (json.loads((runs / n / "metrics.json").read_text()) for n in ("straight", "resumed"))
    assert resumed["test"] == straight["test"] and resumed["val"] == straight["val"]
    a, b = (load_file(runs / n / "artifact" / "adapter_model.safetensors") for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefix_cache_gives_the_same_run(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data")
    config = write_config(tmp_path, data, epochs=3)
    common = ("train", "--config", str(config), "--method", "partial", "--data.augment", "false")
    assert invoke(*common, "--name", "plain").exit_code == 0
    cached = invoke(*common, "--name", "cached", "--train.cache-prefix", "true")
    assert cached.exit_code == 0, cached.output
    plain, fast = (
        json.loads((tmp_path / "runs" / n / "metrics.json").read_text()) for n in ("plain", "cached")
    )
    assert fast["test"] == plain["test"] and fast["val"] == plain["val"]
    assert fast["speed"]["prefix_cut"] > 0 and fast["speed"]["prefix_cache"]["memory_hits"] > 0


def test_prefix_cache_refuses_random_augmentation(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data")
    config = write_config(tmp_path, data)
    # (linear's default L-BFGS probe fits unaugmented features: the optimiser-trained head is refused)
    args = ("--method", "linear", "--method.solver", "sgd", "--train.cache-prefix", "true")
    result = invoke("train", "--config", str(config), *args)
    assert result.exit_code == 2 and "augment" in result.output


def test_a_shorter_epochs_scales_the_configs_warm_up_and_says_so(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", classes=2, per_class=8)
    config = write_config(tmp_path, data, method="bias", epochs=20, warmup_epochs=2)
    result = invoke("train", "--config", str(config), "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "warm-up is scaled by the same factor to 0.1 epochs" in " ".join(result.output.split())
    recorded = yaml.safe_load((tmp_path / "runs" / "bias-3shot-seed0" / "config.yaml").read_text())["train"]
    assert (recorded["epochs"], recorded["warmup_epochs"]) == (1, 0.1)
    # a warm-up given on the command line is the user's: too long, it is refused with the fix
    again = invoke("train", "--config", str(config), "--epochs", "1", "--train.warmup-epochs", "2", "--name", "x")
    assert again.exit_code == 2 and "warmup_epochs (2.0) exceeds epochs (1)" in again.output
    assert "--train.warmup-epochs" in again.output
