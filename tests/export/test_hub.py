"""Hub sharing without a network: push against a stand-in of the upload calls, load from a Hub cache."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from typer.testing import CliRunner

import promptvit
from promptvit.cli import app
from promptvit.errors import HubError
from tests.cli.test_cli import write_config, write_image_folder
from tests.conftest import build_tiny, tiny_input
from tests.export.conftest import COMMIT, populate_hub_cache

runner = CliRunner()


def random_lora(num_classes: int = 3) -> promptvit.PromptModel:
    model = promptvit.wrap(build_tiny("vit_token", num_classes=num_classes), "lora", rank=2)
    with torch.no_grad():
        for _, parameter in model.tuned_named_parameters():
            parameter.copy_(torch.randn_like(parameter))
    return model.eval()


def test_push_model_then_load_from_the_hub_cache_offline(tmp_path, fake_hub, hub_cache):
    from peft import PeftModel

    model = random_lora()
    url = model.push_to_hub("org/tiny-lora", class_names=["a", "b", "c"], multilabel=False)
    assert url.endswith(COMMIT)
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"]
    remote = tmp_path / "remote" / "org" / "tiny-lora"
    assert sorted(p.name for p in remote.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "peft",
    ]
    card = ModelCard.load(remote / "README.md")
    assert card.data.library_name == "promptvit" and card.data.license == "unknown"
    assert {"promptvit", "lora", "peft"} <= set(card.data.tags)
    assert 'promptvit.load("hf-hub:org/tiny-lora")' in card.text and "ORG/NAME" not in card.text
    assert "randomly initialised, seed 0" in card.text
    assert "promptvit.create_backbone('vit_tiny_patch16_224', init_seed=0, num_classes=3" in card.text
    assert 'PeftModel.from_pretrained(base, "org/tiny-lora", subfolder="peft")' in card.text

    populate_hub_cache(hub_cache, "org/tiny-lora", remote)
    images = tiny_input("vit_token", batch=3)
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(promptvit.load("hf-hub:org/tiny-lora").eval()(images), expected)
        assert torch.equal(
            promptvit.PromptModel.from_pretrained("hf-hub:org/tiny-lora@main").eval()(images), expected
        )
        # The peft/ subfolder, loaded by peft itself onto the same timm base.
        peft_model = PeftModel.from_pretrained(build_tiny("vit_token"), str(remote), subfolder="peft").eval()
        assert (peft_model(images) - expected).abs().max() < 1e-5

    with pytest.raises(HubError, match="not in the Hub cache"):
        promptvit.load("hf-hub:org/missing")


def test_peft_and_promptvit_never_take_each_others_adapter_config(tmp_path):
    from peft import PeftModel

    model = random_lora()
    artifact = model.save_pretrained(tmp_path / "artifact")
    with pytest.raises(
        Exception, match="not a peft adapter but a promptvit artifact: load it with promptvit.load"
    ):
        PeftModel.from_pretrained(build_tiny("vit_token"), str(artifact))
    model.save_peft_adapter(tmp_path / "peft")
    with pytest.raises(promptvit.ArtifactError, match="it is a peft adapter: load it with peft.PeftModel"):
        promptvit.load(tmp_path / "peft")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("hubrun")
    data = write_image_folder(tmp / "data")
    config = write_config(tmp, data, epochs=1)
    result = runner.invoke(app, ["train", "--config", str(config), "--name", "run"])
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "run"


def test_push_a_run_folder_from_the_cli_carries_an_honest_card(tmp_path, fake_hub, trained_run):
    run = trained_run
    result = runner.invoke(app, ["push", str(run), "--repo", "hf-hub:org/run", "--license", "cc-by-4.0"])
    assert result.exit_code == 0, result.output
    assert 'promptvit.load("hf-hub:org/run")' in result.output
    remote = tmp_path / "remote" / "org" / "run"
    assert not (remote / "peft").exists()  # linear: peft has no equivalent
    card = ModelCard.load(remote / "README.md")
    metrics = json.loads((run / "metrics.json").read_text())
    test, ci = metrics["test"], metrics["test"]["ci"]
    assert card.data.license == "cc-by-4.0" and "peft" not in card.data.tags
    assert card.data.base_model is None  # random init: no Hub base to link
    # model-index: the raw test metrics
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == pytest.approx(test["accuracy"]) and "nll" in results
    # the table: raw and calibrated, the main metric with its bootstrap interval
    assert f"| accuracy | {test['accuracy']:.4g} [{ci['low']:.4g}, {ci['high']:.4g}] |" in card.text
    assert f"| nll | {test['nll']:.4g} | {test['calibrated']['nll']:.4g} |" in card.text
    recipe = yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recipe["method"] == recorded["method"] and recipe["train"] == recorded["train"]
    assert recipe["data"]["path"] == Path(recorded["data"]["path"]).name  # no path of this machine
    assert "randomly initialised backbone" in card.text


def test_push_refuses_bad_repository_ids_and_an_unreachable_hub_in_one_line(
    tmp_path, monkeypatch, trained_run
):
    for repo in ("../../etc", "org/name/extra", "hf-hub:", "bad name/x"):
        result = runner.invoke(app, ["push", str(trained_run), "--repo", repo])
        assert result.exit_code == 2, result.output
        assert "is not a Hub repository id; write ORG/NAME" in result.output
        assert "Traceback" not in result.output
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    result = runner.invoke(app, ["push", str(trained_run), "--repo", "org/name"])
    assert result.exit_code == 2
    assert "cannot push to org/name: the Hugging Face Hub (http://127.0.0.1:9) cannot be reached" in " ".join(
        result.output.split()
    )
    assert len(result.output.strip().splitlines()) <= 3


def test_every_verb_takes_a_hub_address_offline(tmp_path, fake_hub, hub_cache, trained_run):
    assert runner.invoke(app, ["push", str(trained_run), "--repo", "org/run"]).exit_code == 0
    populate_hub_cache(hub_cache, "org/run", tmp_path / "remote" / "org" / "run")
    data = trained_run.parent.parent / "data"
    images = sorted((data / "class_0").iterdir())[:2]

    local = runner.invoke(
        app, ["predict", str(trained_run), *map(str, images), "--out", str(tmp_path / "a.csv")]
    )
    hub = runner.invoke(
        app, ["predict", "hf-hub:org/run", *map(str, images), "--out", str(tmp_path / "b.csv")]
    )
    assert local.exit_code == 0 and hub.exit_code == 0, hub.output
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()

    result = runner.invoke(
        app, ["eval", "hf-hub:org/run", "--data", str(data), "--out", str(tmp_path / "m.json")]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["export", "hf-hub:org/run", "--format", "onnx", "--out", str(tmp_path / "onnx")]
    )
    assert result.exit_code == 0, result.output

    missing = runner.invoke(
        app, ["predict", "hf-hub:org/other", str(images[0]), "--out", str(tmp_path / "c.csv")]
    )
    assert (
        missing.exit_code == 2
        and "not in the Hub cache" in missing.output
        and "Traceback" not in missing.output
    )


def test_an_access_refusal_is_one_line_saying_how_to_log_in(tmp_path, monkeypatch, fake_hub, trained_run):
    from huggingface_hub import HfApi, errors

    response_class = errors.Response  # the HTTP library huggingface_hub uses (httpx or its successor)
    request = __import__(response_class.__module__).Request("POST", "https://huggingface.co/api/repos/create")

    def refuse(self, repo_id, **options):
        raise errors.HfHubHTTPError(
            "403 Forbidden: you may not write here", response=response_class(403, request=request)
        )

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    result = runner.invoke(app, ["push", str(trained_run), "--repo", "org/theirs"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    flat = " ".join(result.output.split())
    assert "cannot push to org/theirs: the Hub answered 403 Forbidden" in flat and "hf auth login" in flat


def test_serving_and_analysis_take_a_hub_address(tmp_path, fake_hub, hub_cache, trained_run):
    from promptvit.serving import MultiTaskModel

    assert runner.invoke(app, ["push", str(trained_run), "--repo", "org/run"]).exit_code == 0
    populate_hub_cache(hub_cache, "org/run", tmp_path / "remote" / "org" / "run")
    local = promptvit.load(trained_run).eval()
    base = copy.deepcopy(local).unload()
    served = MultiTaskModel(base, ["hf-hub:org/run"]).eval()
    images = tiny_input("vit_token", batch=2)
    with torch.no_grad():
        assert torch.allclose(served(images)["run"], local(images), atol=1e-6)
    data = trained_run.parent.parent / "data"
    result = runner.invoke(
        app,
        [
            "analyze",
            "hf-hub:org/run",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "analysis"),
            "--max-samples",
            "6",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "analysis" / "analysis.json").read_text())["sample"]["n"] == 6
