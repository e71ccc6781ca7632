"""Blocks that skip the prompt outputs nobody reads: the same logits and gradients as the full forward."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

import promptvit
from promptvit.backbones.vit import forward_block_rows as forward_selected_tokens
from promptvit.backbones.vit import supports_selected_rows as supports_selected_tokens
from promptvit.layers.selected_tokens import drop_token_range
from promptvit.layers.token_prompts import TokenPrompts
from tests.conftest import build_tiny, logits_and_grads, tiny_input

VITS = ["vit_token", "vit_avg"]


def _timm_block(**options: object) -> Block:
    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2, qkv_bias=True, **options).double().eval()
    with torch.no_grad():  # non-trivial norm parameters, so that a wrong row selection shows
        for module in block.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    return block


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"qk_norm": True, "scale_attn_norm": True, "init_values": 0.3},
        {"gated": True},
    ],
    ids=["plain", "qk_norm-scale_norm-layer_scale", "gated"],
)
def test_selected_rows_equal_the_rows_of_timms_forward(options: dict) -> None:
    gated = options.pop("gated", False)
    block = _timm_block(**options)
    if gated:  # timm's Attention(gated=True) gate, added to the block built without it
        block.attn.gate = nn.Linear(16, 16, dtype=torch.float64)
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)

    def select(tokens: torch.Tensor) -> torch.Tensor:
        return drop_token_range(tokens, 1, 3)

    expected = select(block(x))
    got = forward_selected_tokens(block, x, select)
    assert got.shape == (3, 6, 16)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), [x])
    (grad_got,) = torch.autograd.grad((got * weights).sum(), [x])
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-12, atol=1e-12)


def test_only_timms_own_block_and_attention_qualify() -> None:
    block = _timm_block()
    assert supports_selected_tokens(block)

    class CustomBlock(Block):
        pass

    block.__class__ = CustomBlock
    assert not supports_selected_tokens(block)
    ept = promptvit.wrap(build_tiny("vit_token"), "ept", prompt_length=2)
    assert supports_selected_tokens(ept.backbone.blocks[0])  # PromptedAttention has forward_selected
    plain = _timm_block()
    plain.attn = nn.Sequential(plain.attn)  # another attention module, without forward_selected
    assert not supports_selected_tokens(plain)


@pytest.mark.parametrize("way", ["pure_cat", "multi_cat", "add", "multiply"])
def test_ept_selected_rows_equal_the_rows_of_its_full_forward(way: str) -> None:
    """EPT's learned tensors have one row per query token; the kept queries must take their own rows."""
    model = promptvit.wrap(build_tiny("vit_avg"), "ept", prompt_length=3, way=way).double().eval()
    with torch.no_grad():  # zero-initialised ways would otherwise hide a wrong row selection
        for _, p in model.method.named_parameters():
            p.normal_(0.0, 0.5)
    block = model.backbone.blocks[-1]
    x = torch.randn(2, model.geometry.num_tokens, 24, dtype=torch.float64, requires_grad=True)

    def select(tokens: torch.Tensor) -> torch.Tensor:
        return drop_token_range(tokens, 2, 5)

    expected = select(block(x))
    got = forward_selected_tokens(block, x, select)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), [x])
    (grad_got,) = torch.autograd.grad((got * weights).sum(), [x])
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-12, atol=1e-12)


def _token_prompt_models(kind: str) -> list[promptvit.PromptModel]:
    """Every registered method that puts prompt tokens into the stream, plus VPT-shallow and AP-concat."""
    models = []
    for name in promptvit.available_methods():
        method_class = promptvit.get_method(name)
        if "vit" not in method_class.supported_kinds:
            continue
        model = promptvit.wrap(build_tiny(kind), name, **method_class.test_options)
        if isinstance(model.method, TokenPrompts) and hasattr(model.method, "prompt_schedule"):
            models.append(model)
    models.append(promptvit.wrap(build_tiny(kind), "vpt", prompt_length=2, deep=False))
    models.append(promptvit.wrap(build_tiny(kind), "ap", variant="concat", prompt_length=2, layer=1))
    models.append(promptvit.wrap(build_tiny(kind), "da_vpt", prompt_length=2, anchor="prompt_attn_out"))
    return models


@pytest.mark.parametrize("kind", VITS)
def test_skipping_prompt_outputs_changes_no_logit_or_gradient(kind: str) -> None:
    x = tiny_input(kind)
    names = []
    for model in _token_prompt_models(kind):
        method = model.method
        names.append(method.name)
        assert method.prompt_output_skipping_blocks, f"{method.name}: no block skips its prompt outputs"
        model.eval()  # no prompt dropout, so both passes see the same prompts
        with torch.no_grad():  # non-zero prompts everywhere, so that every prompt gets a gradient
            for _, p in model.tuned_named_parameters():
                p.add_(0.1 * torch.randn_like(p))
        fast, fast_grads = logits_and_grads(model, x)
        with method.keeping_prompt_outputs():
            full, full_grads = logits_and_grads(model, x)
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6, msg=method.name)
        for fast_grad, full_grad in zip(fast_grads, full_grads, strict=True):
            torch.testing.assert_close(fast_grad, full_grad, rtol=1e-4, atol=1e-6, msg=method.name)
    assert {"vpt", "spt", "da_vpt", "ap"} <= set(names)


def test_deep_vpt_skips_every_block_and_shallow_vpt_only_the_last() -> None:
    deep = promptvit.wrap(build_tiny("vit_avg"), "vpt", prompt_length=2, deep=True)
    shallow = promptvit.wrap(build_tiny("vit_avg"), "vpt", prompt_length=2, deep=False)
    assert deep.method.prompt_output_skipping_blocks == {0, 1, 2}
    assert shallow.method.prompt_output_skipping_blocks == {2}  # blocks 1, 2 read block 0's prompt outputs


def test_da_vpt_keeps_the_prompt_outputs_its_paper_anchor_reads() -> None:
    model = promptvit.wrap(
        build_tiny("vit_avg"), "da_vpt", prompt_length=2, num_proxy_prompts=2, anchor="prompt_attn_out"
    )
    assert not set(model.method.guided) & model.method.prompt_output_skipping_blocks


def test_a_block_of_another_class_runs_its_own_forward() -> None:
    backbone = build_tiny("vit_avg")

    class CustomBlock(Block):
        pass

    backbone.blocks[1].__class__ = CustomBlock
    model = promptvit.wrap(backbone, "vpt", prompt_length=2, deep=True).eval()
    assert model.method.prompt_output_skipping_blocks == {0, 2}
    x = tiny_input("vit_avg")
    with torch.no_grad():
        fast = model(x)
        with model.method.keeping_prompt_outputs():
            torch.testing.assert_close(fast, model(x), rtol=1e-5, atol=1e-6)
