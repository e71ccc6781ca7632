"""Round trips at the borders: however the base was built and the artifact saved, every way back gives the
saved model's logits (within 1e-5) or the documented refusal.

Ways of building the base: ``timm.create_model`` at random (weights of unknown origin), with
``pretrained=True`` through a local-file overlay, the same with other geometry options (image size whose
position embedding timm resamples, pooling, no class token), ``promptvit.create_backbone``, a local weights
file, a Hub id from a pre-populated offline cache. Ways of saving: ``save_pretrained`` and ``promptvit train``.
Ways back: ``promptvit.load(dir)`` without ``base_model``, ``predict``, ``eval``, each export format loaded by
its own tool, and ``push`` to a stand-in then ``load("hf-hub:...")`` offline.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save_file
from typer.testing import CliRunner

import promptvit
from promptvit.artifact import read_artifact_config
from promptvit.cli import app
from promptvit.data import ImageDataset, build_transforms
from promptvit.data.sources import LabeledSamples, Sample
from promptvit.train.clinical import artifact_probabilities
from tests.cli.test_cli import write_image_folder
from tests.export.conftest import populate_hub_cache

runner = CliRunner()
ARCH, HUB_NAME = "vit_tiny_patch16_224", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
#: other geometry, built from the TINY weights: timm resamples the position embedding to 24 px
OTHER_GEOMETRY = {**TINY, "img_size": 24, "global_pool": "avg", "class_token": False}
CLASSES = ["class_0", "class_1"]
TOLERANCE = 1e-5


def tiny_weights(path: Path, class_token: bool = True) -> Path:
    """A weights file of the tiny geometry (what a pretrained checkpoint would be)."""
    torch.manual_seed(11)
    pool = {} if class_token else {"class_token": False, "global_pool": "avg"}
    save_file(timm.create_model(ARCH, **TINY, **pool).state_dict(), str(path))
    return path


def build(kind: str, tmp: Path) -> torch.nn.Module:
    """One way of building the base (num_classes 2)."""
    if kind == "timm_random":
        torch.manual_seed(3)
        return timm.create_model(ARCH, num_classes=2, **TINY)
    if kind == "timm_overlay":
        # custom_load: timm < 1.0.10 would read the file with the npz loader of this name's default weights
        overlay = {"file": str(tiny_weights(tmp / "overlay.safetensors")), "custom_load": False}
        return timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=2, **TINY)
    if kind == "timm_geometry":
        overlay = {"file": str(tiny_weights(tmp / "overlay.safetensors", class_token=False)), "custom_load": False}
        return timm.create_model(
            ARCH, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=2, **OTHER_GEOMETRY
        )
    if kind == "create_backbone":
        return promptvit.create_backbone(ARCH, init_seed=5, num_classes=2, **TINY)
    if kind == "local_file":
        return promptvit.create_backbone(
            ARCH, weights=tiny_weights(tmp / "w.safetensors"), num_classes=2, **TINY
        )
    if kind == "hub":
        return timm.create_model(HUB_NAME, pretrained=True, num_classes=2, **TINY)
    raise AssertionError(kind)


def put_hub_weights(cache: Path, tmp: Path) -> None:
    """timm's Hub repository of HUB_NAME in the offline cache, holding tiny weights."""
    (tmp / "hubfiles").mkdir()
    tiny_weights(tmp / "hubfiles" / "model.safetensors")
    populate_hub_cache(cache, f"timm/{HUB_NAME}", tmp / "hubfiles")


def images_of(data: Path) -> list[Path]:
    return sorted(p for p in data.rglob("*.png"))


def expected_probabilities(model, artifact: Path, data: Path) -> tuple[torch.Tensor, list[int]]:
    info = read_artifact_config(artifact)
    files = images_of(data)
    samples = LabeledSamples([Sample(str(f), 0) for f in files], CLASSES, False, "expected")
    dataset = ImageDataset(samples, build_transforms(info["data_config"], train=False))
    with torch.no_grad():
        logits = model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = [CLASSES.index(f.parent.name) for f in files]
    return artifact_probabilities(logits.double(), info, artifact), labels


def random_images(model, batch: int = 3) -> torch.Tensor:
    height, width = model.geometry.img_size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(7))


def close(actual, expected) -> bool:
    return (torch.as_tensor(actual).float() - expected.float()).abs().max().item() <= TOLERANCE


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "Traceback" not in result.output and flat.count("error:") == 1, result.output
    for fragment in fragments:
        assert fragment in flat, flat


def come_back(model, base, artifact: Path, tmp: Path, data: Path, hub_cache: Path, rebuildable: bool) -> None:
    """Every way back from ``artifact`` gives ``model``'s logits, or the documented refusal."""
    images = random_images(model)
    with torch.no_grad():
        expected = model.eval()(images)
    if not rebuildable:
        call = "base_model=timm.create_model('vit_tiny_patch16_224.augreg_in21k_ft_in1k', num_classes=2, "
        with pytest.raises(promptvit.ArtifactError, match=r"cannot rebuild its backbone") as refusal:
            promptvit.load(artifact)
        assert call in str(refusal.value)
        with torch.no_grad():
            assert close(promptvit.load(artifact, base_model=copy.deepcopy(base)).eval()(images), expected)
        refused = runner.invoke(
            app, ["predict", str(artifact), str(images_of(data)[0]), "--out", str(tmp / "p.csv")]
        )
        one_line_error(refused, "cannot rebuild its backbone", call)
        return

    # promptvit.load with no base_model
    with torch.no_grad():
        assert close(promptvit.load(artifact).eval()(images), expected)

    # predict and eval on image files
    probabilities, labels = expected_probabilities(model, artifact, data)
    result = runner.invoke(app, ["predict", str(artifact), str(data), "--out", str(tmp / "p.csv")])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader((tmp / "p.csv").open()))[1:]
    assert torch.allclose(
        torch.tensor([[float(v) for v in r[1:3]] for r in rows]).double(), probabilities, atol=2e-6
    )
    result = runner.invoke(app, ["eval", str(artifact), "--data", str(data), "--out", str(tmp / "m.json")])
    assert result.exit_code == 0, result.output
    accuracy = (
        100 * sum(int(p.argmax()) == y for p, y in zip(probabilities, labels, strict=True)) / len(labels)
    )
    assert json.loads((tmp / "m.json").read_text())["accuracy"] == pytest.approx(accuracy)

    # each export, loaded by its own tool
    from peft import PeftModel

    for format in ("peft", "merged-timm", "onnx"):
        result = runner.invoke(app, ["export", str(artifact), "--format", format, "--out", str(tmp / format)])
        assert result.exit_code == 0, result.output
    peft_base = copy.deepcopy(base)
    peft_base.reset_classifier(2)
    with torch.no_grad():
        assert close(PeftModel.from_pretrained(peft_base, str(tmp / "peft")).eval()(images), expected)
        merged = timm.create_model(f"local-dir:{tmp / 'merged-timm'}", pretrained=True).eval()
        assert close(merged(images), expected)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert close(session.run(None, {"images": images.numpy()})[0], expected)

    # push to the stand-in, then load("hf-hub:...") from the offline cache
    result = runner.invoke(app, ["push", str(artifact), "--repo", "org/round-trip"])
    assert result.exit_code == 0, result.output
    remote = tmp / "remote" / "org" / "round-trip"
    populate_hub_cache(hub_cache, "org/round-trip", remote)
    record = read_artifact_config(artifact)["base_model"]
    if (
        record.get("origin") == "file"
    ):  # the base weights are not uploaded: the documented refusal, then the fix
        name = Path(record["weights"]).name
        with pytest.raises(
            promptvit.ArtifactError, match=rf"backbone weights file {name} named in .* is not there"
        ):
            promptvit.load("hf-hub:org/round-trip")
        snapshot = promptvit.hub.local_folder("hf-hub:org/round-trip")
        shutil.copy(record["weights"], snapshot / name)
    with torch.no_grad():
        assert close(promptvit.load("hf-hub:org/round-trip").eval()(images), expected)
    # timm's Hub weights: the card links the base and names its licence; timm's config keeps the tag
    card = ModelCard.load(remote / "README.md")
    timm_config = json.loads((tmp / "merged-timm" / "config.json").read_text())["pretrained_cfg"]
    if record.get("origin") == "hub":
        assert card.data.base_model == record["hub_id"] and "released under `apache-2.0`" in card.text
        assert timm_config["tag"] == record["name"].split(".")[1] and timm_config["license"] == "apache-2.0"
    else:
        assert card.data.base_model is None and "tag" not in timm_config


BUILDS = ["timm_random", "timm_overlay", "timm_geometry", "create_backbone", "local_file", "hub"]


@pytest.mark.parametrize("kind", BUILDS)
def test_saved_from_python(kind, tmp_path, fake_hub, hub_cache, recwarn):
    if kind == "hub":
        put_hub_weights(hub_cache, tmp_path)
    base = build(kind, tmp_path)
    keep = copy.deepcopy(base)
    model = promptvit.wrap(base, "lora", rank=2)
    with torch.no_grad():
        for _, parameter in model.tuned_named_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    artifact = model.save_pretrained(tmp_path / "artifact", class_names=CLASSES)
    record = read_artifact_config(artifact)["base_model"]
    rebuildable = kind != "timm_random"
    assert (
        record["origin"]
        == {
            "timm_random": "unknown",
            "timm_overlay": "file",
            "timm_geometry": "file",
            "create_backbone": "random",
            "local_file": "file",
            "hub": "hub",
        }[kind]
    )
    warned = [str(w.message) for w in recwarn if "cannot be rebuilt from the artifact" in str(w.message)]
    assert bool(warned) == (not rebuildable)  # save_pretrained says so
    if kind == "timm_geometry":
        assert {k: record["kwargs"][k] for k in ("img_size", "global_pool", "class_token")} == {
            "img_size": 24,
            "global_pool": "avg",
            "class_token": False,
        }
    data = write_image_folder(tmp_path / "data", classes=2, per_class=3)
    come_back(model, keep, artifact, tmp_path, data, hub_cache, rebuildable)


TRAINED = {
    "create_backbone": {"name": ARCH, "options": TINY},
    "timm_geometry": {"name": ARCH, "options": {**TINY, "img_size": 24, "global_pool": "avg"}},
    "local_file": {"name": ARCH, "options": TINY, "weights": "WEIGHTS"},
    "hub": {"name": HUB_NAME, "options": TINY, "pretrained": True},
}


@pytest.mark.parametrize("kind", sorted(TRAINED))
def test_saved_by_promptvit_train(kind, tmp_path, fake_hub, hub_cache):
    if kind == "hub":
        put_hub_weights(hub_cache, tmp_path)
    backbone = dict(TRAINED[kind])
    if backbone.get("weights"):
        backbone["weights"] = str(tiny_weights(tmp_path / "w.safetensors"))
    data = write_image_folder(tmp_path / "data", classes=2, per_class=4)
    config = {
        "backbone": backbone,
        "method": {"name": "lora", "options": {"rank": 2}},
        "data": {"kind": "folder", "path": str(data), "shots": 2, "test_fraction": 0.25, "val_per_class": 1},
        "train": {"epochs": 1, "batch_size": 4, "optimizer": "adamw", "lr": 0.05, "progress": False},
        "output_dir": str(tmp_path / "runs"),
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "config.yaml"), "--name", "run"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "run"
    model = promptvit.load(run)  # the reference: the artifact as training wrote it
    base = copy.deepcopy(model).unload()
    come_back(model, base, run / "artifact", tmp_path, data, hub_cache, rebuildable=True)
