"""Every registered backbone family adapter, pinned against timm's own forward and modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import promptvit
from promptvit.backbones import (
    BackboneError,
    adapter_for,
    attend,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)
from promptvit.backbones.base import BackboneAdapter
from promptvit.backbones.vit import ViTAdapter
from promptvit.layers.selected_tokens import class_token_row, drop_token_range
from tests.families import build_tiny, family_adapter, present, representatives, tiny_input

#: one build per registered family (the first of its adapter's tiny_builds): these checks are about the
#: family's code paths, which its other builds share
FAMILIES = representatives()
#: every build of the VisionTransformer family (class token or not, registers, attention pooling, q/k norms)
VIT_BUILDS = present(*ViTAdapter.tiny_builds)


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    return build_tiny(name), tiny_input(name, seed=0)


def test_every_registered_family_has_a_tiny_build() -> None:
    """A new family adapter must list tiny builds, so that every test looping over the families covers it."""
    assert {adapter.family for adapter in registered_adapters().values()} == {
        family_adapter(name).family for name in FAMILIES
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_geometry_classifier_and_kind(name: str) -> None:
    model, x = _build(name)
    adapter = adapter_for(model)
    assert name in adapter.tiny_builds
    geometry = adapter.geometry()
    assert geometry.kind == adapter.kind and geometry.architecture == type(model).__name__
    assert adapter.get_classifier() is model.get_submodule(adapter.classifier_name())
    assert adapter.get_classifier() in adapter.classifier_modules()
    with torch.no_grad():
        features = adapter.pre_logits(x)
        if adapter.head_reads_pre_logits():
            assert torch.equal(adapter.classify(features), model(x))
    assert features.shape[-1] == geometry.embed_dim
    replacement = nn.Linear(geometry.embed_dim, 5)
    adapter.set_classifier(replacement)
    assert adapter.get_classifier() is replacement


@pytest.mark.parametrize("name", [n for n in FAMILIES if family_adapter(n).kind == "cnn"])
def test_cnn_stages_and_activation_shapes(name: str) -> None:
    model, x = _build(name)
    adapter = adapter_for(model)
    assert adapter.kind == "cnn" and len(adapter.stages) == adapter.geometry().depth
    seen = []
    handles = [
        s.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[1:]))) for s in adapter.stages
    ]
    with torch.no_grad():
        model(x[:1])
    for handle in handles:
        handle.remove()
    size = tuple(x.shape[-2:])
    assert [adapter.stage_input_shape(size, i) for i in range(len(adapter.stages))] == seen
    with torch.no_grad():  # a pixel prompt goes in at the input module: it must be what sees the images
        captured = []
        handle = adapter.input_module().register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        model(x)
        handle.remove()
    assert torch.equal(captured[0], x)
    if adapter.has_transformer_blocks:  # Swin, SAM, MaxxVit: their blocks, in the order the forward runs them
        order = []
        handles = [b.register_forward_pre_hook(lambda m, a: order.append(m)) for b in adapter.blocks]
        with torch.no_grad():
            model(x[:1])
        for handle in handles:
            handle.remove()
        assert order == list(adapter.blocks) and order
        return
    with pytest.raises(BackboneError, match="no transformer blocks"):
        adapter.blocks  # noqa: B018


@pytest.mark.parametrize("name", VIT_BUILDS)
def test_vit_embed_blocks_norm_head_is_timms_forward(name: str) -> None:
    model, x = _build(name)
    adapter = adapter_for(model)
    with torch.no_grad():
        tokens = adapter.embed(x)
        geometry = adapter.geometry()
        assert tokens.shape[1] == geometry.num_tokens == adapter.num_prefix_tokens + geometry.num_patches
        prefix = model.cls_token is not None
        assert adapter.num_prefix_tokens == adapter.prompt_position == prefix + model.num_reg_tokens
        out = model.forward_head(adapter.final_norm(adapter.forward_blocks(tokens)))
        assert torch.equal(out, model(x))
        # the patch embedding's output is the patch tokens before any position embedding
        assert adapter.patch_embed(x).shape[1] == geometry.num_patches


@pytest.mark.parametrize("name", VIT_BUILDS)
def test_vit_attention_parts_reproduce_timms_attention(name: str) -> None:
    model, x = _build(name)
    adapter = adapter_for(model)
    attn = model.blocks[0].attn
    with torch.no_grad():
        h = model.blocks[0].norm1(adapter.embed(x))
        parts = adapter.attention(0)
        assert (parts.num_heads, parts.head_dim, parts.module) == (attn.num_heads, attn.head_dim, attn)
        torch.testing.assert_close(attend(parts, h), attn(h), rtol=1e-5, atol=1e-6)
        # probabilities by hand: softmax(q k^T * scale) with the q/k norms applied
        q, k, v = parts.heads(h)
        expected = ((q @ k.transpose(-2, -1)) * parts.head_dim**-0.5).softmax(-1)
        torch.testing.assert_close(parts.probabilities(h), expected, rtol=1e-5, atol=1e-6)
        assert adapter.attention_slot(1) == (model.blocks[1], "attn")
        assert adapter.mlp_slot(1) == (model.blocks[1], "mlp")


@pytest.mark.parametrize("name", VIT_BUILDS)
@pytest.mark.parametrize("select", [class_token_row, lambda t: drop_token_range(t, 1, 2)], ids=["row0", "drop"])
def test_vit_selected_rows_equal_the_rows_of_the_full_block(select, name: str) -> None:
    model, x = _build(name)
    adapter = adapter_for(model)
    with torch.no_grad():
        tokens = adapter.embed(x)
        assert adapter.supports_selected_rows(1)
        torch.testing.assert_close(
            adapter.forward_block_rows(1, tokens, select),
            select(model.blocks[1](tokens)),
            rtol=1e-5,
            atol=1e-6,
        )
    assert adapter.reads_class_token_only() == (model.global_pool == "token")
    model.reset_classifier(3, global_pool="avg")
    assert not adapter.reads_class_token_only()


def test_unregistered_models_are_refused_and_subclasses_can_register() -> None:
    with pytest.raises(BackboneError, match="unsupported backbone Sequential"):
        adapter_for(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(BackboneError, match="unsupported backbone"):
        promptvit.wrap(nn.Sequential(nn.Linear(2, 2)), "linear")

    class TinyNet(nn.Sequential):
        pass

    @register_adapter(TinyNet)
    class TinyAdapter(BackboneAdapter):
        kind = "cnn"
        family = "TinyNet"

    try:
        assert isinstance(adapter_for(TinyNet(nn.Linear(2, 2))), TinyAdapter)
        with pytest.raises(ValueError, match="already has the adapter"):
            register_adapter(TinyNet)(TinyAdapter)
    finally:
        unregister_adapter(TinyNet)
    with pytest.raises(BackboneError, match="unsupported backbone TinyNet"):
        adapter_for(TinyNet(nn.Linear(2, 2)))
