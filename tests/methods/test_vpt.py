"""VPT (and the token-prompt helpers it shares with SPT, DA-VPT and AP-concat)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import promptvit
from promptvit.layers.token_prompts import (
    expand_prompts,
    insert_prompts,
    replace_prompts,
    strip_prompts,
    vpt_init_bound,
)
from tests.conftest import build_tiny, tiny_input, without_readout

VITS = ["vit_token", "vit_avg"]


def vit_b16(num_classes: int = 100) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", num_classes=num_classes)


def reference_forward(
    vit: torch.nn.Module, prompts: torch.Tensor, x: torch.Tensor, deep: bool
) -> torch.Tensor:
    """VPT written step by step from timm's own submodules, on an unhooked copy of the backbone."""
    n, length = vit.num_prefix_tokens, prompts.shape[1]
    t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for i, block in enumerate(vit.blocks):
        p = prompts[i if deep else 0].expand(x.shape[0], -1, -1)
        if i == 0:
            t = torch.cat([t[:, :n], p, t[:, n:]], dim=1)
        elif deep:
            t = torch.cat([t[:, :n], p, t[:, n + length :]], dim=1)
        t = block(t)
    t = torch.cat([t[:, :n], t[:, n + length :]], dim=1)
    return vit.forward_head(vit.norm(t))


@pytest.mark.parametrize("kind", VITS)
@pytest.mark.parametrize("deep", [True, False])
def test_matches_step_by_step_reference(kind: str, deep: bool) -> None:
    base = build_tiny(kind, num_classes=4)
    reference = copy.deepcopy(base)
    model = without_readout(promptvit.wrap(base, "vpt", prompt_length=3, deep=deep)).eval()
    prompts = model.method.prompts
    assert prompts.shape == (len(base.blocks) if deep else 1, 3, base.embed_dim)
    x = tiny_input(kind)
    with torch.no_grad():
        # the hooked model skips rows the reference computes (the replaced prompt outputs), so the
        # matmuls run over other shapes and may sum in another order: equal up to float rounding
        torch.testing.assert_close(model(x), reference_forward(reference, prompts, x, deep), rtol=1e-5, atol=1e-6)


def _record_blocks(model: promptvit.PromptModel) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.backbone.blocks):

        def record(module, args, output, i=i):
            inputs[i], outputs[i] = args[0].detach(), output.detach()

        block.register_forward_hook(record)  # sees the input the block loop gives the block, prompts inserted
    return inputs, outputs


@pytest.mark.parametrize("kind", VITS)
def test_shallow_prompts_reach_later_blocks_only_through_the_sequence(kind: str) -> None:
    model = promptvit.wrap(build_tiny(kind), "vpt", prompt_length=2, deep=False).eval()
    inputs, outputs = _record_blocks(model)
    with torch.no_grad(), model.all_token_outputs():  # every block runs as a module, so its hooks fire
        model(tiny_input(kind))
    n = model.geometry.num_prefix_tokens
    assert torch.equal(inputs[0][:, n : n + 2], model.method.prompts[0].expand(2, -1, -1))
    for i in range(1, len(model.backbone.blocks)):
        assert torch.equal(inputs[i], outputs[i - 1])
        assert inputs[i].shape[1] == model.geometry.num_tokens + 2


@pytest.mark.parametrize("kind", VITS)
def test_deep_prompts_replace_previous_prompt_outputs(kind: str) -> None:
    model = promptvit.wrap(build_tiny(kind), "vpt", prompt_length=2, deep=True).eval()
    inputs, outputs = _record_blocks(model)
    n = model.geometry.num_prefix_tokens
    with torch.no_grad(), model.all_token_outputs():
        model(tiny_input(kind))
    for i in range(1, len(model.backbone.blocks)):
        assert torch.equal(inputs[i][:, n : n + 2], model.method.prompts[i].expand(2, -1, -1))
        assert torch.equal(inputs[i][:, :n], outputs[i - 1][:, :n])
        assert torch.equal(inputs[i][:, n + 2 :], outputs[i - 1][:, n + 2 :])
    # By default a block does not compute the prompt outputs that the next block replaces: it reads every
    # token (its first norm sees them all) and its MLP runs on the other rows only.
    norm_inputs, mlp_rows = {}, {}
    for i, block in enumerate(model.backbone.blocks):
        block.norm1.register_forward_pre_hook(lambda m, args, i=i: norm_inputs.__setitem__(i, args[0]))
        block.mlp.register_forward_pre_hook(lambda m, args, i=i: mlp_rows.__setitem__(i, args[0].shape[1]))
    with torch.no_grad():
        model(tiny_input(kind))
    for i in range(len(model.backbone.blocks)):
        assert norm_inputs[i].shape[1] == model.geometry.num_tokens + 2
        assert torch.equal(norm_inputs[i][:, n : n + 2], model.method.prompts[i].expand(2, -1, -1))
    assert mlp_rows[0] == model.geometry.num_tokens


@pytest.mark.parametrize("kind", VITS)
def test_prompts_are_stripped_before_norm_and_pooling(kind: str) -> None:
    model = without_readout(promptvit.wrap(build_tiny(kind), "vpt", prompt_length=3)).eval()
    x = tiny_input(kind)
    seen = {}
    model.backbone.norm.register_forward_hook(lambda m, args, out: seen.update(norm_in=args[0]))
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape[1] == model.geometry.num_tokens
    assert seen["norm_in"].shape[1] == model.geometry.num_tokens
    with torch.no_grad():
        assert torch.equal(model.forward_head(features), logits)
        if kind == "vit_avg":  # averages the patch tokens only (no prefix tokens, no prompts)
            pooled = model.backbone.fc_norm(features.mean(dim=1))
            torch.testing.assert_close(model.forward_head(features, pre_logits=True), pooled)


def test_without_token_prompts_runs_the_plain_backbone() -> None:
    base = build_tiny("vit_token", num_classes=4)
    reference = copy.deepcopy(base)
    model = without_readout(promptvit.wrap(base, "vpt", prompt_length=2)).eval()
    x = tiny_input("vit_token")
    with torch.no_grad():
        prompted = model(x)
        with model.method.without_token_prompts():
            assert torch.equal(model(x), reference(x))
        assert torch.equal(model(x), prompted)


def test_vit_b16_counts_match_the_spt_paper() -> None:
    deep = promptvit.wrap(vit_b16(), "vpt", prompt_length=20, deep=True)
    assert deep.parameter_summary()["method"] == 20 * 12 * 768 == 184_320
    shallow = promptvit.wrap(vit_b16(), "vpt", prompt_length=100, deep=False)
    assert shallow.parameter_summary()["method"] == 100 * 768 == 76_800
    for model in (deep, shallow):
        cls = promptvit.get_method("vpt")
        assert (
            cls.expected_num_parameters(model.config, model.geometry) == model.parameter_summary()["method"]
        )


def test_init_bound() -> None:
    assert vpt_init_bound(16, 768) == 0.0625
    assert vpt_init_bound((16, 16), 768) == 0.0625
    model = promptvit.wrap(build_tiny("vit_token"), "vpt", prompt_length=50)
    bound = vpt_init_bound(8, 32)
    prompts = model.method.prompts
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.8 * bound


def test_dropout_only_in_train_mode_and_backbone_stays_in_eval() -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "vpt", prompt_length=4, dropout=0.5)
    x = tiny_input("vit_token")
    model.train()
    assert model.method.prompt_dropout.training
    assert not any(m.training for m in model.backbone.blocks.modules())
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
    no_dropout = promptvit.wrap(build_tiny("vit_token"), "vpt", prompt_length=4, dropout=0.0).train()
    with torch.no_grad():
        assert torch.equal(no_dropout(x), no_dropout(x))


def test_frozen_prompts_are_kept_but_not_tuned(tmp_path) -> None:
    model = promptvit.wrap(
        build_tiny("vit_token"), "vpt", prompt_length=2, frozen_prompts=True, num_classes=4
    )
    assert model.parameter_summary()["method"] == 0
    assert "method.prompts" in model.tuned_state_dict()
    assert promptvit.get_method("vpt").expected_num_parameters(model.config, model.geometry) == 0
    x = tiny_input("vit_token")
    model.eval().save_pretrained(tmp_path / "artifact")
    loaded = promptvit.load(tmp_path / "artifact", base_model=build_tiny("vit_token")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_state_dict_names_of_the_backbone_are_unchanged() -> None:
    base = build_tiny("vit_token")
    names = {f"backbone.{n}" for n in base.state_dict()}
    model = promptvit.wrap(base, "vpt", prompt_length=2)
    # the backbone's own head stays inside its slot, next to the adapter's head
    names = {n.replace("backbone.head.", "backbone.head.base_layer.") for n in names}
    adapter = {"adapters.default.prompts", "backbone.head.heads.default.weight", "backbone.head.heads.default.bias"}
    assert set(model.state_dict()) - names == adapter
    assert set(model.tuned_state_dict()) == {"method.prompts", "backbone.head.weight", "backbone.head.bias"}


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(prompt_length=0), "prompt_length"),
        (dict(dropout=1.0), "dropout"),
        (dict(init="xavier"), "init"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(promptvit.ConfigError, match=message):
        promptvit.wrap(build_tiny("vit_token"), "vpt", **options)


def test_cnn_is_refused() -> None:
    with pytest.raises(promptvit.ConfigError, match="supports vit"):
        promptvit.wrap(build_tiny("resnet"), "vpt")


def test_token_prompt_helpers() -> None:
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 prefix + 4 patches
    p = -torch.ones(2, 3)
    inserted = insert_prompts(x, p, num_prefix_tokens=1)
    assert inserted.shape == (2, 7, 3)
    assert torch.equal(inserted[:, 0], x[:, 0]) and torch.equal(inserted[:, 3:], x[:, 1:])
    assert torch.equal(inserted[:, 1:3], p.expand(2, -1, -1))
    # deep replacement with another length (DA-VPT allows per-layer lengths)
    replaced = replace_prompts(inserted, -2 * torch.ones(1, 1, 3), num_prefix_tokens=1, num_old=2)
    assert replaced.shape == (2, 6, 3) and torch.equal(replaced[:, 1], -2 * torch.ones(2, 3))
    assert torch.equal(strip_prompts(replaced, 1, 1), x)
    assert torch.equal(strip_prompts(insert_prompts(x, p, 0), 0, 2), x)
    with pytest.raises(ValueError, match="fewer than"):
        replace_prompts(x, p, num_prefix_tokens=1, num_old=5)
    assert expand_prompts(p, 4).shape == (4, 2, 3)
