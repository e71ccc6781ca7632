"""AP: additive / product activation prompts at one block (ViT) or stage (CNN), and the concat variant."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import promptvit
from promptvit.backbones import cnn_stages
from promptvit.layers.token_prompts import vpt_init_bound
from tests.conftest import build_tiny, tiny_input, without_readout

VITS = ["vit_token", "vit_avg"]


def vit_b16(num_classes: int = 100) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", num_classes=num_classes)


def efficientnet_lite0(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0", num_classes=3, **kwargs).eval()


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.blocks) if promptvit.geometry_of(model).kind == "vit" else cnn_stages(model)


def _record_unit_inputs(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    inputs: dict[int, torch.Tensor] = {}
    for i, unit in enumerate(_units(model)):

        def record(module, args, output, i=i):
            inputs[i] = args[0].detach()

        unit.register_forward_hook(record)  # runs after the method's pre-hooks: sees the prompted input
    return inputs


CASES = [
    ("vit_token", {}, 16),
    ("vit_avg", {}, 16),
    ("resnet", {"cnn_input_size": [32, 32]}, 32),
]


@pytest.mark.parametrize("variant", ["add", "product"])
@pytest.mark.parametrize("kind,options,size", CASES)
def test_zero_init_reproduces_timm(kind: str, options: dict, size: int, variant: str) -> None:
    base = build_tiny(kind, num_classes=4)
    reference = copy.deepcopy(base)
    depth = len(_units(base))
    for layer in (0, depth - 1):
        model = promptvit.wrap(copy.deepcopy(base), "ap", layer=layer, variant=variant, **options)
        model = without_readout(model).eval()
        x = tiny_input(kind)
        with torch.no_grad():
            assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("variant", ["add", "product"])
@pytest.mark.parametrize("via", ["option", "pretrained_cfg"])
def test_zero_init_reproduces_timm_on_efficientnet_lite0(variant: str, via: str) -> None:
    if via == "option":
        base, options = efficientnet_lite0(), {"cnn_input_size": [64, 64]}
    else:  # the configured input size of the backbone itself
        base, options = efficientnet_lite0(pretrained_cfg_overlay=dict(input_size=(3, 64, 64))), {}
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, "ap", layer=5, variant=variant, **options).eval()
    assert model.method.delta.shape == (112, 4, 4)  # input of blocks[5] = output of blocks[4], stride 16
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("variant", ["add", "product"])
@pytest.mark.parametrize("kind,options,size", CASES)
def test_delta_changes_only_from_its_block_on(kind: str, options: dict, size: int, variant: str) -> None:
    base = build_tiny(kind, num_classes=4)
    reference = copy.deepcopy(base)
    layer = 1
    model = promptvit.wrap(base, "ap", layer=layer, variant=variant, **options).eval()
    with torch.no_grad():
        model.method.delta.copy_(torch.randn_like(model.method.delta))
    seen, expected = _record_unit_inputs(model.backbone), _record_unit_inputs(reference)
    x = tiny_input(kind)
    with torch.no_grad():
        model(x)
        reference(x)
    delta = model.method.delta
    for i in range(len(seen)):
        if i < layer:
            assert torch.equal(seen[i], expected[i]), i
        elif i == layer:
            prompted = expected[i] + delta if variant == "add" else expected[i] * (1 + delta)
            assert torch.equal(seen[i], prompted)
        else:
            assert not torch.equal(seen[i], expected[i]), i


def test_vit_b16_count() -> None:
    model = promptvit.wrap(vit_b16(), "ap", layer=3)
    assert model.method.delta.shape == (197, 768)
    assert model.parameter_summary()["method"] == 197 * 768 == 151_296
    concat = promptvit.wrap(vit_b16(), "ap", variant="concat", prompt_length=10)
    assert concat.parameter_summary()["method"] == 10 * 768
    cls = promptvit.get_method("ap")
    for m in (model, concat):
        assert cls.expected_num_parameters(m.config, m.geometry) == m.parameter_summary()["method"]


def test_cnn_shape_on_the_meta_device() -> None:
    with torch.device("meta"):
        base = timm.create_model("resnet10t", num_classes=10)
    model = promptvit.wrap(base, "ap", layer=2)  # resnet10t's configured input: 176 px
    assert model.method.delta.shape == (128, 22, 22) and model.method.delta.is_meta
    assert model.parameter_summary()["method"] == 128 * 22 * 22


def test_probe_leaves_batchnorm_statistics_and_modes_alone() -> None:
    base = build_tiny("resnet").train()
    before = {n: b.clone() for n, b in base.named_buffers()}
    model = promptvit.wrap(base, "ap", layer=3, cnn_input_size=[32, 32])
    assert all(torch.equal(before[n], b) for n, b in model.backbone.named_buffers())
    assert model.training and model.method.training


@pytest.mark.parametrize("kind", VITS)
def test_concat_tokens_appear_only_from_block_l_on(kind: str) -> None:
    base = build_tiny(kind, num_classes=4)
    layer = 1
    model = promptvit.wrap(base, "ap", variant="concat", layer=layer, prompt_length=3).eval()
    seen = _record_unit_inputs(model.backbone)
    x = tiny_input(kind)
    with torch.no_grad(), model.all_token_outputs():  # hooks on blocks: every block runs as a module
        features = model.forward_features(x)
    n, tokens = model.geometry.num_prefix_tokens, model.geometry.num_tokens
    for i, t in seen.items():
        assert t.shape[1] == (tokens + 3 if i >= layer else tokens), i
    assert torch.equal(seen[layer][:, n : n + 3], model.method.prompts.expand(2, -1, -1))
    assert features.shape[1] == tokens  # stripped before the final norm
    # init: VPT's uniform bound, so not identity at init
    bound = vpt_init_bound(model.geometry.patch_size, model.geometry.embed_dim)
    assert 0 < model.method.prompts.abs().max() <= bound


def test_concat_on_cnn_is_refused() -> None:
    with pytest.raises(promptvit.ConfigError, match="concat"):
        promptvit.wrap(build_tiny("resnet"), "ap", variant="concat")


def test_layer_out_of_range_is_refused() -> None:
    with pytest.raises(promptvit.ConfigError, match="layer=4 .* 4 stages"):
        promptvit.wrap(build_tiny("resnet"), "ap", layer=4)
    with pytest.raises(promptvit.ConfigError, match="layer=2 .* 2 blocks"):
        promptvit.wrap(build_tiny("vit_token"), "ap", layer=2)


def test_wrong_input_size_names_the_expected_size() -> None:
    model = promptvit.wrap(build_tiny("resnet"), "ap", layer=2, cnn_input_size=[32, 32])
    with pytest.raises(ValueError, match="feed 32x32 images"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(layer=-1), "layer"),
        (dict(variant="mul"), "variant"),
        (dict(prompt_length=0), "prompt_length"),
        (dict(cnn_input_size=[0, 32]), "cnn_input_size"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(promptvit.ConfigError, match=message):
        promptvit.wrap(build_tiny("vit_token"), "ap", **options)


def test_default_layer_is_the_papers() -> None:
    """Third ViT block; for a ResNet-50/101 the input of layer4 = the input of its third-to-last residual block."""
    with torch.device("meta"):
        vit_l = timm.create_model("vit_large_patch16_224", num_classes=10)
        resnet101 = timm.create_model("resnet101", num_classes=10)
    assert promptvit.wrap(vit_l, "ap").method.config.layer == 2
    assert len(resnet101.layer4) == 3  # so layer4's input is the third-to-last block's input
    assert promptvit.wrap(resnet101, "ap", cnn_input_size=[64, 64]).method.config.layer == 3
    assert promptvit.wrap(build_tiny("vit_token"), "ap").method.config.layer == 1  # only 2 blocks: the last
