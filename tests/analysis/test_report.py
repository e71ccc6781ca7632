"""End-to-end ``analyze`` on tiny wrapped ViTs: every file, strict JSON, refusals, models left untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import promptvit
from promptvit.analysis import analyze, average_attention_distance, layer_cka, layer_nmi
from promptvit.io import OUTPUT_MARKER, OutputError, output_folder
from tests.conftest import build_tiny

CLASSES = ["benign", "malignant", "other"]
PNG = b"\x89PNG\r\n\x1a\n"


def _dataset(n: int = 18, multilabel: bool = False) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 16, 16, generator=g)
    if multilabel:
        targets = (torch.rand(n, 3, generator=g) > 0.5).float()
        targets[0] = 0.0  # no positive class -> "none"
    else:
        targets = torch.arange(n) % 3
    return TensorDataset(images, targets)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_analyze_writes_every_view(tmp_path) -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "linear", num_classes=3)
    vpt = promptvit.wrap(build_tiny("vit_token", seed=1), "vpt", num_classes=3, prompt_length=2)
    model.train()
    before, hooks = _state(model), len(model.backbone.blocks[0]._forward_hooks)
    out = output_folder(tmp_path / "run" / "analysis", "analysis")  # as an earlier analysis left it
    (out / "notes.txt").write_text("mine")  # the user's, added since: it stays
    result = analyze(
        model, _dataset(), out_dir=out, class_names=CLASSES, max_samples=12, seed=3, compare={"vpt": vpt}
    )

    expected = {
        "calibration.png",
        "reliability.png",
        "attention_distance.png",
        "attention_maps_linear.png",
        "attention_maps_vpt.png",
        "nmi.png",
        "cka_prompts_patches_vpt.png",
        "cka_layers_linear_vs_vpt.png",
        "analysis.json",
    }
    assert set(result["files"]) == expected
    for name in expected - {"analysis.json"}:
        assert (out / name).read_bytes()[:8] == PNG, name
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted(expected | {"notes.txt", OUTPUT_MARKER})

    stored = json.loads(
        (out / "analysis.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}")
    )
    assert stored == result
    sample = stored["sample"]
    assert sample["n"] == 12 and len(sample["indices"]) == 12 and sample["seed"] == 3
    assert sum(sample["class_counts"].values()) == 12
    views = stored["views"]
    assert set(views["calibration"]) == {"linear", "vpt"}
    assert len(views["calibration"]["vpt"]["pca"]["coords"]) == 12
    assert len(views["attention_distance"]["per_layer_head"]["linear"]) == 2
    nmi = views["nmi"]["per_layer"]["vpt"]
    assert nmi["images"] == [12, 12] and all(0 <= m <= 1 for m in nmi["mean"])
    assert len(views["cka_prompts_patches"]["matrix"]["vpt"]) == 2
    # the orchestrator's numbers are those of the stand-alone helpers on the same sample
    images = _dataset().tensors[0][sample["indices"]]
    assert nmi["mean"] == pytest.approx(layer_nmi(vpt, images)["mean"])
    np.testing.assert_allclose(
        views["cka_layers"]["pairs"]["vpt"]["matrix"], layer_cka(model, vpt, images), atol=1e-9
    )
    np.testing.assert_allclose(
        views["attention_distance"]["per_layer_head"]["vpt"],
        average_attention_distance(vpt, images),
        rtol=1e-6,
    )
    assert len(views["cka_layers"]["pairs"]["vpt"]["matrix"]) == 2
    assert stored["models"]["vpt"]["prompt_tokens_at_block_input"] == [2, 2]
    assert stored["models"]["vpt"]["configured_prompt_length"] == 2
    assert "nmi:linear" in stored["skipped"] and "token_scale" in stored["skipped"]
    # the same seed gives the same sample
    again = analyze(
        model, _dataset(), out_dir=tmp_path / "again", class_names=CLASSES, max_samples=12, seed=3, tsne=False
    )
    assert again["sample"]["indices"] == sample["indices"]

    # the model is left as it was
    assert model.training and model.get_classifier().training
    assert len(model.backbone.blocks[0]._forward_hooks) == hooks
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_analyze_with_token_scale_cnn_and_multilabel(tmp_path) -> None:
    ept = promptvit.wrap(build_tiny("vit_avg"), "ept", num_classes=3, prompt_length=3)
    cnn = promptvit.wrap(build_tiny("resnet"), "linear", num_classes=3)
    data = _dataset(n=8, multilabel=True)
    result = analyze(
        ept,
        data,
        out_dir=tmp_path / "a",
        class_names=CLASSES,
        max_samples=8,
        tsne=False,
        compare={"resnet": cnn},
    )
    files = set(result["files"])
    assert {"calibration.png", "attention_distance.png", "cka_layers_ept_vs_resnet.png"} <= files
    assert "attention_maps_ept.png" not in files  # no class token, no prompt tokens
    assert "attention:resnet" in result["skipped"] and "attention_maps:ept" in result["skipped"]
    if result["models"]["ept"]["attention_source"][0] == "attention_weights":
        assert "token_scale.png" in files  # EPT exposes its patch-wise gate
    # multi-label colouring: the first positive class, -1 ("none") without one
    first_positive = [int(t.nonzero()[0]) if t.any() else -1 for _, t in data]
    assert result["views"]["calibration"]["ept"]["labels"] == first_positive
    assert result["sample"]["class_counts"]["none"] == first_positive.count(-1) >= 1
    assert len(result["views"]["cka_layers"]["pairs"]["resnet"]["matrix"][0]) == 4  # 4 ResNet stages


@pytest.mark.parametrize("marker", ["metrics.json", "artifact"])
def test_refuses_run_folder_and_artifact(tmp_path, marker: str) -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "linear", num_classes=3)
    run = tmp_path / "run"
    (run / "artifact").mkdir(parents=True)
    if marker != "artifact":
        (run / marker).touch()
    with pytest.raises(OutputError, match="promptvit did not write"):
        analyze(model, _dataset(), out_dir=run, class_names=CLASSES, max_samples=4)
    (run / OUTPUT_MARKER).write_text('{"kind": "run"}')  # as train marks a run folder: another kind
    with pytest.raises(OutputError, match="holds a promptvit run"):
        analyze(model, _dataset(), out_dir=run, class_names=CLASSES, max_samples=4)
    assert sorted(p.name for p in run.iterdir()) == sorted({"artifact", marker, OUTPUT_MARKER})
    assert not any((run / "artifact").iterdir())


def test_attention_layer_without_attention_is_skipped(tmp_path) -> None:
    class Opaque(torch.nn.Module):
        def forward(self, x, attn_mask=None, is_causal=False):
            return x

    model = promptvit.wrap(build_tiny("vit_token"), "linear", num_classes=3)
    model.backbone.blocks[1].attn = Opaque()
    result = analyze(
        model, _dataset(), out_dir=tmp_path / "a", class_names=CLASSES, max_samples=4, tsne=False
    )
    assert "its attention cannot be recomputed" in result["skipped"]["attention:linear"]
    assert result["files"] == ["calibration.png", "reliability.png", "analysis.json"]
