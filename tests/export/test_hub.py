"""Hub sharing without a network: push against a stand-in of the upload calls, load from a Hub cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants
from typer.testing import CliRunner

import promptvit
from promptvit.cli import app
from tests.cli.test_cli import write_config, write_image_folder
from tests.conftest import build_tiny, tiny_input

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    """HfApi.create_repo/upload_folder record their calls and copy the folder into ``tmp_path/remote``."""
    calls = []

    def create_repo(self, repo_id, **options):
        calls.append(("create_repo", repo_id, options))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **options):
        calls.append(("upload_folder", repo_id, options))
        shutil.copytree(folder_path, tmp_path / "remote" / repo_id)
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def populate_hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """The layout huggingface_hub's cache uses: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(files, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def offline(monkeypatch, cache: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_push_model_then_load_from_the_hub_cache_offline(tmp_path, monkeypatch, fake_hub):
    model = promptvit.wrap(build_tiny("vit_token"), "lora", rank=2)
    with torch.no_grad():
        for _, parameter in model.tuned_named_parameters():
            parameter.copy_(torch.randn_like(parameter))
    url = model.push_to_hub("org/tiny-lora", class_names=["a", "b", "c"], multilabel=False)
    assert url.endswith(COMMIT)
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"]
    remote = tmp_path / "remote" / "org" / "tiny-lora"
    assert sorted(p.name for p in remote.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    card = (remote / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "promptvit" and "lora" in front["tags"]
    assert "method **lora** on the timm backbone `vit_tiny_patch16_224` (randomly initialised)" in card

    populate_hub_cache(tmp_path / "hub", "org/tiny-lora", remote)
    offline(monkeypatch, tmp_path / "hub")
    loaded = promptvit.load("hf-hub:org/tiny-lora").eval()
    images = tiny_input("vit_token", batch=3)
    with torch.no_grad():
        assert torch.equal(loaded(images), model.eval()(images))

    with pytest.raises(promptvit.ArtifactError, match="not in the Hub cache"):
        promptvit.load("hf-hub:org/missing")


def test_push_a_run_folder_from_the_cli_carries_metrics_data_and_recipe(tmp_path, fake_hub):
    data = write_image_folder(tmp_path / "data")
    config = write_config(tmp_path, data, epochs=1)
    runner = CliRunner()
    assert runner.invoke(app, ["train", "--config", str(config), "--name", "run"]).exit_code == 0
    run = tmp_path / "runs" / "run"
    result = runner.invoke(app, ["push", str(run), "--repo", "org/run"])
    assert result.exit_code == 0, result.output
    assert 'promptvit.load("hf-hub:org/run")' in result.output
    card = (tmp_path / "remote" / "org" / "run" / "README.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"| test | accuracy | {metrics['test']['accuracy']:.4g} |" in card
    assert (run / "data.txt").read_text().strip() in card
    recipe = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe) == yaml.safe_load((run / "config.yaml").read_text())
    assert "randomly initialised backbone" in card
