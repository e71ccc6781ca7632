"""LoRA on timm's fused qkv: formula, peft parity, merge/unmerge, dropout, options and counts."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

import promptvit
from promptvit.layers.lora import FusedLoRALinear
from promptvit.methods.lora import LoRA, LoRAConfig
from tests.conftest import build_tiny, tiny_input, without_readout

QKV = ("q", "k", "v")


def _lora_layers(model) -> list[FusedLoRALinear]:
    return [m for m in model.modules() if isinstance(m, FusedLoRALinear)]


def _randomize_b(model, seed: int = 0) -> None:
    """B starts at zero; give it values so the update is active."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _lora_layers(model):
            layer.lora["default"].lora_B.copy_(0.2 * torch.randn(layer.lora["default"].lora_B.shape, generator=generator))


@pytest.mark.parametrize("kind", ["vit_token", "vit_avg"])
@pytest.mark.parametrize("targets", [["q", "v"], ["q", "k", "v"], ["k"]])
def test_zero_init_reproduces_timm_exactly(kind: str, targets: list[str]) -> None:
    base = build_tiny(kind)
    reference = copy.deepcopy(base)
    model = without_readout(promptvit.wrap(base, "lora", rank=2, targets=targets)).eval()
    x = tiny_input(kind)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_init_is_kaiming_uniform_a_and_zero_b() -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "lora", rank=4)
    d = model.geometry.embed_dim
    for layer in _lora_layers(model):
        assert layer.lora["default"].lora_A.shape == (2, 4, d) and layer.lora["default"].lora_B.shape == (2, d, 4)
        # kaiming_uniform(a=sqrt(5)) on fan-in d: U(-1/sqrt(d), 1/sqrt(d)), per part
        assert layer.lora["default"].lora_A.abs().max() <= 1 / math.sqrt(d)
        assert layer.lora["default"].lora_A.std() > 0.5 / math.sqrt(3 * d)
        assert torch.count_nonzero(layer.lora["default"].lora_B) == 0
        assert not torch.equal(layer.lora["default"].lora_A[0], layer.lora["default"].lora_A[1])


def test_layer_matches_formula_on_chosen_parts_only() -> None:
    torch.manual_seed(0)
    d, r, alpha = 8, 2, 6.0
    linear = torch.nn.Linear(d, 3 * d)
    layer = FusedLoRALinear(linear)
    layer.add_adapter("default", parts=[2, 0], rank=r, alpha=alpha)  # given unsorted: stored as (q, v)
    assert layer.lora["default"].parts == (0, 2)
    with torch.no_grad():
        layer.lora["default"].lora_B.normal_()
    x = torch.randn(3, 5, d)
    expected = linear(x).clone()
    for i, p in enumerate(layer.lora["default"].parts):
        a, b = layer.lora["default"].lora_A[i], layer.lora["default"].lora_B[i]
        expected[..., p * d : (p + 1) * d] += (alpha / r) * x @ a.T @ b.T
    got = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[..., d : 2 * d], linear(x)[..., d : 2 * d])  # k untouched


def test_frozen_names_gain_only_a_prefix_and_layers_option() -> None:
    base = build_tiny("vit_avg")  # 3 blocks
    names = set(base.state_dict())
    model = promptvit.wrap(base, "lora", rank=2, layers=[1])
    wrapped = set(model.backbone.state_dict())
    assert "blocks.1.attn.qkv.base_layer.weight" in wrapped and "blocks.1.attn.qkv.weight" not in wrapped
    renamed = {
        n.replace("blocks.1.attn.qkv.", "blocks.1.attn.qkv.base_layer.").replace("head.", "head.base_layer.")
        for n in names
    }
    # each adapter's factors and head sit under its name; artifacts drop it (tuned_state_dict keys)
    adapter = {"blocks.1.attn.qkv.lora.default.lora_A", "blocks.1.attn.qkv.lora.default.lora_B"}
    assert renamed | adapter | {"head.heads.default.weight", "head.heads.default.bias"} == wrapped
    assert set(model.tuned_state_dict()) == {
        "backbone.blocks.1.attn.qkv.lora_A",
        "backbone.blocks.1.attn.qkv.lora_B",
        "backbone.head.weight",
        "backbone.head.bias",
    }
    assert len(_lora_layers(model)) == 1
    assert isinstance(model.backbone.blocks[0].attn.qkv, torch.nn.Linear)


@pytest.mark.parametrize(
    "options,expected",
    [
        ({}, 12 * 2 * 8 * 2 * 768),
        ({"rank": 4, "targets": ["q", "k", "v"]}, 12 * 3 * 4 * 2 * 768),
        ({"layers": [0, 11], "targets": ["v"]}, 2 * 1 * 8 * 2 * 768),
    ],
)
def test_count_at_vit_b16_geometry(options: dict, expected: int) -> None:
    with torch.device("meta"):
        base = timm.create_model("vit_base_patch16_224", num_classes=10)
    model = promptvit.wrap(base, "lora", **options)
    assert model.parameter_summary()["method"] == expected
    assert LoRA.expected_num_parameters(model.config, model.geometry) == expected


def _peft_reference(base, targets: list[str], rank: int, alpha: float, ours):
    """peft LoRA on the whole fused qkv, holding our per-part factors exactly.

    peft cannot target slices of a fused qkv (peft#1705), so with T targeted parts it gets rank T*r and
    alpha T*alpha (same alpha/r scaling): A_peft stacks our A_p, B_peft (3d x T*r) holds our B_p as
    diagonal blocks on the rows of part p and zeros elsewhere (untargeted parts get no update).
    """
    peft = pytest.importorskip("peft")
    n = len(targets)
    config = peft.LoraConfig(r=n * rank, lora_alpha=n * alpha, target_modules=["qkv"], lora_dropout=0.0)
    reference = peft.get_peft_model(base, config)
    blocks = reference.base_model.model.blocks
    pairs = []
    with torch.no_grad():
        for block, layer in zip(blocks, _lora_layers(ours), strict=True):
            peft_layer = block.attn.qkv
            a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
            d = layer.part_size
            a.copy_(layer.lora["default"].lora_A.reshape(n * rank, -1))
            b.zero_()
            for i, p in enumerate(layer.lora["default"].parts):
                b[p * d : (p + 1) * d, i * rank : (i + 1) * rank] = layer.lora["default"].lora_B[i]
            pairs.append((layer, a, b))
    return reference, pairs


@pytest.mark.parametrize("kind", ["vit_token", "vit_avg"])
@pytest.mark.parametrize("targets", [["q"], ["q", "v"], ["q", "k", "v"]])
def test_matches_peft_unmerged_gradients_and_merged(kind: str, targets: list[str]) -> None:
    rank, alpha = 2, 5.0
    base = build_tiny(kind)
    reference_base = copy.deepcopy(base)
    ours = promptvit.wrap(base, "lora", rank=rank, alpha=alpha, targets=targets).eval()
    _randomize_b(ours)
    reference, pairs = _peft_reference(reference_base, targets, rank, alpha, ours)
    reference.eval()
    x = tiny_input(kind, batch=3)
    weights = torch.randn(3, ours.num_classes, generator=torch.Generator().manual_seed(5))

    ours_logits, ref_logits = ours(x), reference(x)
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-6, rtol=1e-6)
    (ours_logits * weights).sum().backward()
    (ref_logits * weights).sum().backward()
    for layer, a, b in pairs:
        d, n = layer.part_size, len(layer.lora["default"].parts)
        torch.testing.assert_close(layer.lora["default"].lora_A.grad.reshape(n * rank, -1), a.grad, atol=1e-6, rtol=1e-5)
        for i, p in enumerate(layer.lora["default"].parts):
            block = b.grad[p * d : (p + 1) * d, i * rank : (i + 1) * rank]
            torch.testing.assert_close(layer.lora["default"].lora_B.grad[i], block, atol=1e-6, rtol=1e-5)

    with torch.no_grad():
        ours.merge()
        merged_reference = reference.merge_and_unload()
        torch.testing.assert_close(ours(x), merged_reference(x), atol=1e-6, rtol=1e-6)
        for block, layer in zip(merged_reference.blocks, _lora_layers(ours), strict=True):
            torch.testing.assert_close(layer.base_layer.weight, block.attn.qkv.weight, atol=1e-6, rtol=1e-6)


def _trained_model(kind: str = "vit_token", **options):
    model = promptvit.wrap(build_tiny(kind), "lora", num_classes=4, rank=2, **options)
    model.train()
    optimizer = torch.optim.SGD([p for _, p in model.tuned_named_parameters()], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(
            model(tiny_input(kind, batch=4)), torch.tensor([0, 1, 2, 3])
        ).backward()
        optimizer.step()
    assert all(torch.count_nonzero(layer.lora["default"].lora_B) for layer in _lora_layers(model))
    return model.eval()


def test_merge_unmerge_restores_weights_and_merged_forward_matches() -> None:
    model = _trained_model()
    layers = _lora_layers(model)
    original = [layer.base_layer.weight.clone() for layer in layers]
    x = tiny_input("vit_token")
    with torch.no_grad():
        unmerged = model(x)
        model.merge()
        assert model.method.merged and all(layer.lora["default"].merged for layer in layers)
        assert not torch.equal(layers[0].base_layer.weight, original[0])
        merged_weights = [layer.base_layer.weight.clone() for layer in layers]
        torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-6)
        # Merging twice is a no-op: the update is not added a second time.
        model.merge()
        assert all(
            torch.equal(layer.base_layer.weight, w) for layer, w in zip(layers, merged_weights, strict=True)
        )
        model.unmerge()
        assert not model.method.merged
        for layer, weight in zip(layers, original, strict=True):
            torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-6)
        # Unmerging an unmerged model is a no-op too.
        before = [layer.base_layer.weight.clone() for layer in layers]
        model.unmerge()
        assert all(torch.equal(layer.base_layer.weight, w) for layer, w in zip(layers, before, strict=True))


def test_merged_forward_skips_update_and_refuses_training() -> None:
    model = _trained_model()
    model.merge()
    layer = _lora_layers(model)[0]
    with torch.no_grad():
        layer.lora["default"].lora_B.add_(1.0)  # ignored while merged: the forward only uses the merged weight
        x = torch.randn(2, 5, layer.base_layer.in_features)
        assert torch.equal(layer(x), layer.base_layer(x))
        layer.lora["default"].lora_B.sub_(1.0)
    model.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(tiny_input("vit_token"))


def test_save_while_merged_stores_unmerged_factors(tmp_path) -> None:
    model = _trained_model()
    x = tiny_input("vit_token")
    with torch.no_grad():
        unmerged = model(x)
        factors = {n: p.clone() for n, p in model.tuned_named_parameters()}
        model.merge()
        merged = model(x)
    model.save_pretrained(tmp_path / "artifact")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "artifact" / "adapter_model.safetensors")
    assert set(saved) == set(factors)
    assert all(torch.equal(saved[n], factors[n]) for n in factors)
    assert not any("base_layer" in n for n in saved)
    loaded = promptvit.load(tmp_path / "artifact", base_model=build_tiny("vit_token")).eval()
    assert not loaded.method.merged
    with torch.no_grad():
        assert torch.equal(loaded(x), unmerged)
        loaded.merge()
        assert torch.equal(loaded(x), merged)
    for a, b in zip(_lora_layers(loaded), _lora_layers(model), strict=True):
        assert torch.equal(a.base_layer.weight, b.base_layer.weight)


def test_dropout_only_in_train_mode() -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "lora", num_classes=4, rank=2, dropout=0.5)
    x = tiny_input("vit_token")
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        zero_b_train = model(x)
        model.eval()
        plain = model(x)
        # With B = 0 the dropped LoRA branch adds nothing: dropout never touches the frozen path.
        assert torch.equal(zero_b_train, plain)
        _randomize_b(model)
        eval_once, eval_twice = model(x), model(x)
        assert torch.equal(eval_once, eval_twice)
        for layer in _lora_layers(model):
            layer.lora["default"].lora_dropout.p = 0.0
        assert torch.equal(model(x), eval_once)  # eval mode: as if there were no dropout
        for layer in _lora_layers(model):
            layer.lora["default"].lora_dropout.p = 0.5
        model.train()
        torch.manual_seed(1)
        train_once = model(x)
        torch.manual_seed(2)
        train_twice = model(x)
        assert not torch.equal(train_once, eval_once)
        assert not torch.equal(train_once, train_twice)


def test_deepcopy_keeps_merge_working_on_the_copy() -> None:
    model = _trained_model()
    clone = copy.deepcopy(model)
    original = _lora_layers(model)[0].base_layer.weight.clone()
    clone.merge()
    assert clone.method.merged and not model.method.merged
    assert torch.equal(_lora_layers(model)[0].base_layer.weight, original)
    assert not torch.equal(_lora_layers(clone)[0].base_layer.weight, original)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"rank": 0}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": ["x"]}, "targets"),
        ({"targets": []}, "targets"),
        ({"targets": ["q", "q"]}, "targets"),
        ({"layers": [-5]}, "layers"),  # negative indices count from the end; -5 does not exist
        ({"layers": [0, 0]}, "layers"),
        ({"layers": []}, "layers"),
        ({"rank": "8"}, "rank"),
    ],
)
def test_bad_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(promptvit.ConfigError, match=match):
        promptvit.wrap(build_tiny("vit_token"), "lora", **options)


def test_layer_beyond_depth_is_refused_and_config_round_trips() -> None:
    with pytest.raises(promptvit.ConfigError, match="do not exist"):
        promptvit.wrap(build_tiny("vit_token"), "lora", layers=[2])  # 2 blocks
    config = LoRAConfig(targets=("v", "q"), layers=(1,))
    assert LoRAConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["targets"] == ["v", "q"]


def test_cnn_is_refused() -> None:
    with pytest.raises(promptvit.ConfigError, match="supports vit"):
        promptvit.wrap(build_tiny("resnet"), "lora")
