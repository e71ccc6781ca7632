"""Export: a peft adapter, a plain timm checkpoint and ONNX, each loaded back by the target tool itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

import promptvit
from promptvit.cli import app
from promptvit.export import ATOL, RTOL, ExportError, export
from promptvit.io import OUTPUT_MARKER, OutputError
from promptvit.methods.base import get_method
from tests.conftest import TINY_BACKBONES, build_tiny, tiny_input

runner = CliRunner()
MERGEABLE = ["lora", "bias", "norm", "partial", "full", "linear"]


def tuned_artifact(tmp_path: Path, method: str, kind: str = "vit_token", **options) -> Path:
    """A saved artifact whose tuned tensors are random (zero-initialised updates would hide mistakes)."""
    options = {**get_method(method).test_options, **options}
    model = promptvit.wrap(build_tiny(kind), method, **options)
    with torch.no_grad():
        for _, parameter in model.tuned_named_parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    size = TINY_BACKBONES[kind][2]
    data_config = {"input_size": [3, size, size]}
    return model.save_pretrained(
        tmp_path / "artifact", class_names=["a", "b", "c"], multilabel=False, data_config=data_config
    )


def reference_logits(artifact: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return promptvit.load(artifact).eval()(images)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The tolerance export promises (and checks at export time): ATOL + RTOL * max|logits|."""
    bound = ATOL + RTOL * expected.abs().max().item()
    assert (torch.as_tensor(actual) - expected).abs().max().item() <= bound
    assert expected.abs().max() > 0.05  # the tuned tensors actually move the logits


def cli_export(artifact: Path, out: Path, format: str) -> None:
    result = runner.invoke(app, ["export", str(artifact), "--format", format, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "logits match" in result.output


@pytest.mark.parametrize(
    "options", [{}, {"targets": ["q", "k", "v"], "rank": 3, "alpha": 5.0}, {"targets": ["k"], "layers": [1]}]
)
def test_peft_adapter_loads_onto_the_plain_timm_model_with_equal_logits(tmp_path, options):
    from peft import PeftModel

    artifact = tuned_artifact(tmp_path, "lora", **options)
    cli_export(artifact, tmp_path / "peft", "peft")
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    targets = options.get("targets", ["q", "v"])
    assert adapter["peft_type"] == "LORA"
    assert adapter["r"] == len(targets) * options.get("rank", 2)
    assert len(adapter["target_modules"]) == len(options.get("layers", [0, 1]))

    images = tiny_input("vit_token", batch=4, seed=5)
    # The user's side: the same timm backbone (same weights, a 3-class head), then peft's own loader.
    peft_model = PeftModel.from_pretrained(build_tiny("vit_token"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert_close(peft_model(images), reference_logits(artifact, images))


def test_peft_export_of_a_method_without_lora_is_refused(tmp_path):
    artifact = tuned_artifact(tmp_path, "bias")
    result = runner.invoke(app, ["export", str(artifact), "--format", "peft", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert (
        "method 'bias' cannot be exported as peft: Hugging Face peft has no equivalent of it; formats that "
        "work for it: merged-timm, onnx" in " ".join(result.output.split())
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_timm_checkpoint_loads_with_timm_and_gives_equal_logits(tmp_path, method):
    artifact = tuned_artifact(tmp_path, method)
    out = tmp_path / "timm"
    cli_export(artifact, out, "merged-timm")
    arch, options, _ = TINY_BACKBONES["vit_token"]
    images = tiny_input("vit_token", batch=4, seed=5)
    plain = timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=3),
        num_classes=3,
        **options,
    ).eval()
    assert not any(isinstance(m, promptvit.methods.base.TunerLayer) for m in plain.modules())
    expected = reference_logits(artifact, images)
    with torch.no_grad():
        assert_close(plain(images), expected)
        # timm's Hub folder layout: config.json carries the build options.
        assert_close(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(images), expected)


def test_merged_timm_checkpoint_of_a_cnn(tmp_path):
    artifact = tuned_artifact(tmp_path, "bias", kind="resnet")
    cli_export(artifact, tmp_path / "timm", "merged-timm")
    images = tiny_input("resnet", batch=2, seed=5)
    plain = timm.create_model(
        "resnet10t",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors"), num_classes=3),
        num_classes=3,
    ).eval()
    with torch.no_grad():
        assert_close(plain(images), reference_logits(artifact, images))


@pytest.mark.parametrize(
    ("method", "why"),
    [
        ("vpt", "it adds tensors of its own (method.prompt"),
        ("ept", "its layers in blocks.0.attn, blocks.1.attn do not fold into the backbone's weights"),
        ("adapter", "its layers in blocks.0.mlp, blocks.1.mlp do not fold into the backbone's weights"),
        ("mlp", "its layers in head do not fold into the backbone's weights"),
    ],
)
def test_merged_timm_refuses_methods_that_do_not_live_in_timm_weights(tmp_path, method, why):
    artifact = tuned_artifact(tmp_path, method)
    result = runner.invoke(app, ["export", str(artifact), "-f", "merged-timm", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert f"method '{method}' cannot be exported as merged-timm: {why}" in line, line
    assert line.count("error:") == 1 and "Traceback" not in line
    # Only the formats that work are named.
    assert line.split("formats that work for it: ")[1].startswith("onnx")
    assert not (tmp_path / "x").exists()


def test_a_refusal_lists_every_changed_block_or_says_how_many_more(tmp_path):
    options = {"depth": 6}
    model = promptvit.wrap(
        promptvit.create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, num_heads=2, **options),
        "adapter",
        num_classes=2,
    )
    with pytest.raises(ExportError, match=r"blocks.0.mlp, blocks.1.mlp, blocks.2.mlp and 3 more do not fold"):
        export(model, tmp_path / "x", "merged-timm")


def onnx_cases() -> list[tuple[str, str]]:
    """Every registered method, on the tiny ViT and, where it applies, on the tiny ResNet."""
    cases = []
    for name in promptvit.available_methods():
        for kind in ("vit_token", "resnet"):
            if get_method(name).supported_kinds.count("vit" if kind == "vit_token" else "cnn"):
                cases.append((name, kind))
    return cases


@pytest.mark.parametrize(("method", "kind"), onnx_cases())
def test_onnx_export_runs_in_onnxruntime_with_equal_logits_and_any_batch_size(tmp_path, method, kind):
    ort = pytest.importorskip("onnxruntime")
    artifact = tuned_artifact(tmp_path, method, kind=kind)
    record = export(artifact, tmp_path / "onnx", "onnx")
    assert record["merged"] == (method == "lora")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # traced with 2 images: the batch axis is dynamic
        images = tiny_input(kind, batch=batch, seed=batch)
        (logits,) = session.run(None, {"images": images.numpy()})
        assert_close(torch.from_numpy(logits), reference_logits(artifact, images))


def test_export_never_writes_into_a_foreign_folder(tmp_path):
    artifact = tuned_artifact(tmp_path, "linear")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="holds files promptvit did not write"):
        export(artifact, foreign, "merged-timm")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    # An earlier export is replaced file by file; what the user added to the folder stays.
    export(artifact, tmp_path / "again", "merged-timm")
    (tmp_path / "again" / "notes.txt").write_text("mine")
    export(artifact, tmp_path / "again", "onnx")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        OUTPUT_MARKER,
        "export.json",
        "model.onnx",
        "notes.txt",
    ]
    assert (tmp_path / "again" / "notes.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export(artifact, tmp_path / "y", "tflite")
