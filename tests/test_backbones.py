"""Backbone creation: hub failures, local weights files, geometry."""

from __future__ import annotations

import time

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

import promptvit
from promptvit.backbones import BackboneError, create_backbone, load_weights
from tests.conftest import TINY_BACKBONES, build_tiny


def test_unreachable_hub_says_how_to_use_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(BackboneError, match=r"--weights path/to/weights.safetensors"):
        create_backbone("vit_tiny_patch16_224.augreg_in21k", pretrained=True)
    assert time.perf_counter() - started < 60


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(BackboneError, match="no_such_vit"):
        create_backbone("no_such_vit")


def test_random_init_is_reproducible_from_the_seed() -> None:
    a, b, c = (build_tiny("vit_token", seed=s) for s in (3, 3, 4))
    assert torch.equal(a.pos_embed, b.pos_embed) and not torch.equal(a.pos_embed, c.pos_embed)


def test_local_safetensors_and_pth_weights(tmp_path) -> None:
    arch, options, _ = TINY_BACKBONES["vit_token"]
    source = build_tiny("vit_token", seed=7)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = create_backbone(arch, weights=tmp_path / name, **options)
        assert torch.equal(model.pos_embed, source.pos_embed)
        assert model.promptvit_source["weights"].endswith(name)


def test_weights_file_errors_name_the_file(tmp_path) -> None:
    model = build_tiny("vit_token")
    with pytest.raises(BackboneError, match="not found"):
        load_weights(model, tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BackboneError, match="bad.safetensors"):
        load_weights(model, tmp_path / "bad.safetensors")
    save_file(build_tiny("vit_avg").state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(BackboneError, match="does not match"):
        load_weights(model, tmp_path / "other.safetensors")


class Payload:
    """Stands for an arbitrary pickled object (which could run code when unpickled)."""


def test_a_pickle_with_code_is_refused(tmp_path) -> None:
    """PyTorch checkpoints are read with weights_only=True: arbitrary pickled objects are not executed."""
    torch.save({"state_dict": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match="weights-only"):
        load_weights(build_tiny("vit_token"), tmp_path / "evil.pth")


def test_geometry_of_cnn_and_vit() -> None:
    vit = promptvit.geometry_of(build_tiny("vit_avg"))
    assert (vit.kind, vit.num_prefix_tokens, vit.num_patches, vit.global_pool) == ("vit", 0, 16, "avg")
    assert promptvit.geometry_of(build_tiny("resnet")).kind == "cnn"


def test_an_unreachable_hub_is_not_retried(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Without HF_HUB_OFFLINE and without a network, the download runs in offline mode (cache only), so the
    good error comes at once instead of after about a minute of retries."""
    import timm.models._hub as timm_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    modes = []
    download = timm_hub.hf_hub_download

    def recording(*args, **kwargs):
        modes.append(huggingface_hub.constants.HF_HUB_OFFLINE)
        return download(*args, **kwargs)

    monkeypatch.setattr(timm_hub, "hf_hub_download", recording)
    with pytest.raises(BackboneError, match=r"--weights path/to/weights.safetensors"):
        create_backbone("vit_tiny_patch16_224.augreg_in21k", pretrained=True)
    assert modes and all(modes)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored afterwards
