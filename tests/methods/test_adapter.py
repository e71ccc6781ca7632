"""AdaptFormer: identity at init, the block formula, counts at ViT-B/16, scale, dropout and options."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch.nn import functional as F

import promptvit
from promptvit.backbones import create_backbone
from promptvit.layers.adapter import ParallelAdapterMlp
from promptvit.methods.adapter import Adapter
from tests.conftest import TINY_BACKBONES, build_tiny, tiny_input, without_readout


def _adapters(model) -> list[ParallelAdapterMlp]:
    return [m for m in model.modules() if isinstance(m, ParallelAdapterMlp)]


def _randomize_up(model, seed: int = 0) -> None:
    """``up`` starts at zero; give it values so the adapter branch is active."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _adapters(model):
            for p in (layer.adapter["default"].up.weight, layer.adapter["default"].up.bias, layer.adapter["default"].down.bias):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("kind", ["vit_token", "vit_avg"])
def test_zero_init_reproduces_timm_exactly(kind: str) -> None:
    base = build_tiny(kind)
    reference = copy.deepcopy(base)
    model = without_readout(promptvit.wrap(base, "adapter", reduction=4)).eval()
    x = tiny_input(kind)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    for layer in _adapters(model):
        bottleneck = layer.adapter["default"]
        assert torch.count_nonzero(bottleneck.up.weight) == 0 and torch.count_nonzero(bottleneck.up.bias) == 0
        assert torch.count_nonzero(bottleneck.down.bias) == 0
        assert bottleneck.down.weight.abs().max() <= 1 / math.sqrt(model.geometry.embed_dim)


@pytest.mark.parametrize("kind", ["vit_token", "vit_avg"])
def test_block_output_matches_the_formula(kind: str) -> None:
    """x'' = x' + MLP(LN2(x')) + s * up(ReLU(down(LN2(x')))), with x' = x + Attn(LN1(x))."""
    scale = 0.7
    model = promptvit.wrap(build_tiny(kind), "adapter", reduction=4, scale=scale).eval()
    _randomize_up(model)
    block = model.backbone.blocks[1]
    layer = block.mlp
    x = torch.randn(2, model.geometry.num_tokens, model.geometry.embed_dim)
    with torch.no_grad():
        x1 = x + block.attn(block.norm1(x))
        h = block.norm2(x1)
        down, up = layer.adapter["default"].down, layer.adapter["default"].up
        adapter = F.linear(F.relu(F.linear(h, down.weight, down.bias)), up.weight, up.bias)
        expected = x1 + layer.base_layer(h) + scale * adapter
        got = block(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, x1 + layer.base_layer(h), atol=1e-3)  # the adapter branch is active


@pytest.mark.parametrize(
    "options,expected",
    [
        ({}, 12 * (768 * 96 + 96 + 96 * 768 + 768)),  # d // 8 = 96
        ({"bottleneck": 64}, 12 * (768 * 64 + 64 + 64 * 768 + 768)),  # AdaptFormer's ViT-B width
        ({"reduction": 4, "layers": [0, 5, 11]}, 3 * (768 * 192 + 192 + 192 * 768 + 768)),
    ],
)
def test_count_at_vit_b16_geometry(options: dict, expected: int) -> None:
    with torch.device("meta"):
        base = timm.create_model("vit_base_patch16_224", num_classes=10)
    model = promptvit.wrap(base, "adapter", **options)
    assert model.parameter_summary()["method"] == expected
    assert Adapter.expected_num_parameters(model.config, model.geometry) == expected
    if not options:
        assert expected == 1_779_840


def test_scale_option_is_respected() -> None:
    x = tiny_input("vit_token")
    outputs = {}
    for scale in (0.1, 0.3):
        model = promptvit.wrap(build_tiny("vit_token"), "adapter", reduction=4, scale=scale).eval()
        _randomize_up(model)
        layer = model.backbone.blocks[0].mlp
        assert layer.adapter["default"].scale == scale
        h = torch.randn(2, 5, model.geometry.embed_dim)
        with torch.no_grad():
            torch.testing.assert_close(layer(h), layer.base_layer(h) + scale * layer.adapter["default"](h))
            outputs[scale] = model(x)
    assert not torch.allclose(outputs[0.1], outputs[0.3], atol=1e-4)


def test_bottleneck_overrides_reduction_and_layers_option() -> None:
    base = build_tiny("vit_avg")  # d = 24, 3 blocks
    names = set(base.state_dict())
    model = promptvit.wrap(base, "adapter", reduction=4, bottleneck=5, layers=[0, 2])
    layers = _adapters(model)
    assert len(layers) == 2 and not isinstance(model.backbone.blocks[1].mlp, ParallelAdapterMlp)
    assert all(layer.adapter["default"].down.out_features == 5 for layer in layers)
    wrapped = set(model.backbone.state_dict())
    assert "blocks.0.mlp.base_layer.fc1.weight" in wrapped and "blocks.1.mlp.fc1.weight" in wrapped
    renamed = set()
    for name in names:
        for i in (0, 2):
            prefix = f"blocks.{i}.mlp."
            if name.startswith(prefix):
                name = f"{prefix}base_layer.{name[len(prefix) :]}"
        renamed.add(name.replace("head.", "head.base_layer."))
    tuned = {n for n in wrapped if ".adapter." in n}
    head = {"head.heads.default.weight", "head.heads.default.bias"}
    assert renamed | tuned | head == wrapped and len(tuned) == 2 * 4


def test_frozen_mlp_stays_in_eval_mode_and_dropout_only_in_train_mode() -> None:
    arch, options, _ = TINY_BACKBONES["vit_token"]
    torch.manual_seed(0)
    base = create_backbone(arch, num_classes=3, proj_drop_rate=0.5, **options).eval()  # MLP has dropout
    model = promptvit.wrap(base, "adapter", num_classes=4, reduction=4, dropout=0.5)
    x = tiny_input("vit_token")
    model.train()
    for layer in _adapters(model):
        assert layer.adapter["default"].training and not layer.base_layer.training
    with torch.no_grad():
        torch.manual_seed(0)
        zero_up_train = model(x)
        model.eval()
        plain = model(x)
        # up = 0: the adapter adds nothing and the frozen MLP's own dropout is off even in train mode.
        assert torch.equal(zero_up_train, plain)
        _randomize_up(model)
        eval_once = model(x)
        assert torch.equal(model(x), eval_once)
        model.train()
        torch.manual_seed(1)
        train_once = model(x)
        torch.manual_seed(2)
        assert not torch.equal(train_once, model(x))
        assert not torch.equal(train_once, eval_once)


def test_cannot_merge() -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "adapter", reduction=4)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge()


@pytest.mark.parametrize(
    "options,match",
    [
        ({"reduction": 0}, "reduction"),
        ({"reduction": 64}, "no bottleneck"),  # 32 // 64 = 0
        ({"bottleneck": 0}, "bottleneck"),
        ({"dropout": -0.1}, "dropout"),
        ({"layers": [5]}, "do not exist"),
        ({"layers": [True]}, "layers"),
        ({"scale": "big"}, "scale"),
    ],
)
def test_bad_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(promptvit.ConfigError, match=match):
        promptvit.wrap(build_tiny("vit_token"), "adapter", **options)
