"""The family-specific maths of every registered backbone family: tiny builds from the adapters' ``tiny_builds``.

Every method on every build (tuned set, identity at init, artifacts, disable/unload, serving, cached prefix) is
the method matrix, tests/methods/test_matrix.py; here are the checks of one family's own positions, heads and
blocks, and the method combinations the matrix does not make (all of a family's methods served together,
medical-backbone shapes).
"""

from __future__ import annotations

import copy

import pytest
import timm.layers
import timm.models.beit
import timm.models.eva
import torch
import torch.nn.functional as F

import promptvit
from promptvit.layers.lora import FusedLoRALinear
from promptvit.methods.base import ConfigError
from tests.families import (
    FAMILY_BUILDS,
    MEDICAL_BUILDS,
    family_adapter,
    method_cases,
    method_options,
    present,
    supports,
    tiny_input,
    visible_build,
)

METHODS = promptvit.available_methods()


def _wrap(method: str, name: str, medical: bool = False) -> promptvit.PromptModel:
    options = promptvit.get_method(method).test_options if medical else method_options(method, name)
    return promptvit.wrap(visible_build(name, medical=medical), method, num_classes=4, **options)


def _step(model: promptvit.PromptModel, x: torch.Tensor) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for _, p in model.tuned_named_parameters()], lr=0.5)
    targets = torch.arange(x.shape[0]) % 4
    F.cross_entropy(model(x), targets).backward()
    optimizer.step()
    model.eval()


def test_every_registered_family_has_tiny_builds_of_its_own() -> None:
    adapters = set(promptvit.backbones.registered_adapters().values())
    assert all(adapter.tiny_builds for adapter in adapters)
    for adapter in adapters:
        for name in present(*adapter.tiny_builds):
            assert type(family_adapter(name)) is adapter, name


def test_distilled_vit_tunes_both_heads_and_averages_them() -> None:
    model = _wrap("linear", "deit_distilled").eval()
    backbone = model.backbone
    head, head_dist = model.get_classifier(), *model.extra_heads()
    assert head.weight.requires_grad and head_dist.weight.requires_grad
    assert model.parameter_summary()["head"] == 2 * (32 * 4 + 4)
    x = tiny_input("deit_distilled")
    with torch.no_grad():
        tokens = backbone.forward_features(x)
        expected = (head(tokens[:, 0]) + head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(model(x), expected)


# ---------------------------------------------------------------------- Swin's window-attention blocks


def _swin_block_widths() -> list[int]:
    """Width of every Swin block from the build options: ``embed_dim * 2**stage``, ``depths[stage]`` times."""
    _, options, _ = FAMILY_BUILDS["swin"]
    return [options["embed_dim"] * 2**stage for stage, n in enumerate(options["depths"]) for _ in range(n)]


def test_swin_lora_and_adapter_counts_follow_each_stage_width() -> None:
    widths = _swin_block_widths()
    lora = _wrap("lora", "swin")  # rank 2 on q and v
    assert lora.parameter_summary()["method"] == sum(2 * 2 * 2 * d for d in widths)
    adapter = _wrap("adapter", "swin")  # bottleneck d // 4
    assert adapter.parameter_summary()["method"] == sum(2 * d * (d // 4) + d // 4 + d for d in widths)
    only_last = promptvit.wrap(visible_build("swin"), "lora", num_classes=4, rank=2, layers=[len(widths) - 1])
    assert only_last.parameter_summary()["method"] == 2 * 2 * 2 * widths[-1]
    assert type(only_last.backbone.layers[0].blocks[0].attn.qkv) is torch.nn.Linear  # stage 0 untouched
    assert type(only_last.backbone.layers[-1].blocks[-1].attn.qkv) is FusedLoRALinear
    with pytest.raises(ConfigError, match="do not exist"):
        promptvit.wrap(visible_build("swin"), "lora", num_classes=4, layers=[len(widths)])


def test_the_swin_build_has_shifted_windows() -> None:
    """So that the method matrix (LoRA merged vs unmerged, serving, ...) goes through shifted windows on Swin."""
    model = visible_build("swin")
    assert any(block.shift_size for stage in model.layers for block in stage.blocks)


# ---------------------------------------------------------------------- rotary positions (Eva)


def _record_rotations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (rotated tokens, rotary table) timm's Eva and RoPE attentions compute."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = timm.models.eva.apply_rot_embed_cat

    def recording(x, emb, *args, **kwargs):
        out = original(x, emb, *args, **kwargs)
        calls.append((out, emb))
        return out

    monkeypatch.setattr(timm.models.eva, "apply_rot_embed_cat", recording)
    try:  # timm's AttentionRope (RoPE ViTs, newer timm only)
        import timm.layers.attention as rope_attention
    except ImportError:
        return calls
    monkeypatch.setattr(rope_attention, "apply_rot_embed_cat", recording)
    return calls


@pytest.mark.parametrize("name", present("eva02", "vit_rope", "dinov3"))
def test_prompts_get_no_rotary_position_and_patches_keep_theirs(name: str, monkeypatch) -> None:
    plain = visible_build(name)
    prompted = promptvit.wrap(visible_build(name), "vpt", num_classes=3, prompt_length=3, deep=True).eval()
    x = tiny_input(name)
    calls = _record_rotations(monkeypatch)
    with torch.no_grad():
        plain(x)
        without = list(calls)
        calls.clear()
        with prompted.all_token_outputs():
            prompted(x)
    num_patches = plain.patch_embed.num_patches
    assert len(calls) == len(without) == 2 * len(plain.blocks)  # q and k in every block
    for (out, table), (_, table_plain) in zip(calls, without, strict=True):
        assert out.shape[-2] == num_patches  # exactly the patch tokens are rotated, prompts are not
        assert torch.equal(table, table_plain)  # by the same positions as without prompts
    # block 0 sees the same patch tokens with or without prompts: identical rotated queries and keys
    for (out, _), (out_plain, _) in zip(calls[:2], without[:2], strict=True):
        assert torch.equal(out, out_plain)


@pytest.mark.parametrize("name", present("vit_rope", "beit"))
def test_position_hooks_for_prompts_are_undone_by_unload(name: str) -> None:
    model = promptvit.wrap(visible_build(name), "vpt", prompt_length=2, deep=True).eval()
    x = tiny_input(name)
    with torch.no_grad():
        model(x)
    backbone = model.unload()
    n = backbone.patch_embed.num_patches + 1
    for block in backbone.blocks:
        attn = block.attn
        assert not attn._forward_pre_hooks and not attn._forward_hooks
        if name == "vit_rope":
            assert attn.num_prefix_tokens == 1
        else:
            assert attn._get_rel_pos_bias().shape[-1] == n


# ---------------------------------------------------------------------- relative position bias (Beit)


def _record_attention_masks(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    masks: list[torch.Tensor] = []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(timm.models.beit.F, "scaled_dot_product_attention", recording)
    return masks


@pytest.mark.parametrize("shared", [False, True], ids=["per_block_bias", "shared_bias"])
def test_prompts_get_zero_relative_bias_and_patches_keep_theirs(shared: bool, monkeypatch) -> None:
    arch, options, _ = FAMILY_BUILDS["beit"]
    options = dict(options, use_rel_pos_bias=not shared, use_shared_rel_pos_bias=shared)
    plain = promptvit.create_backbone(arch, num_classes=3, **options).eval()
    with torch.no_grad():  # a bias table away from its zero init, so that a shifted bias shows
        for name, p in plain.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_()
    prompted = promptvit.wrap(copy.deepcopy(plain), "vpt", prompt_length=3, deep=True).eval()
    x = tiny_input("beit")
    masks = _record_attention_masks(monkeypatch)
    with torch.no_grad():
        plain(x)
        without = list(masks)
        masks.clear()
        with prompted.all_token_outputs():
            prompted(x)
    assert len(masks) == len(without) == len(plain.blocks)
    n = plain.patch_embed.num_patches + 1
    kept = torch.tensor([0, *range(4, n + 3)])  # class token, then the patches after 3 prompts
    for bias, bias_plain in zip(masks, without, strict=True):
        assert bias.shape[-1] == n + 3
        assert torch.equal(bias[..., kept[:, None], kept], bias_plain)
        assert not bias[..., 1:4, :].any() and not bias[..., :, 1:4].any()
        assert bias_plain.abs().sum() > 0


# ---------------------------------------------------------------------- EPT on rotary and relative-bias attention


def _ept_family(name: str) -> torch.nn.Module:
    """A tiny build whose position maths shows: Beit's bias tables away from their zero init (and a Beit
    variant with one bias shared by all blocks)."""
    if name == "beit_shared":
        arch, options, _ = FAMILY_BUILDS["beit"]
        options = dict(options, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
        model = promptvit.create_backbone(arch, num_classes=3, init_seed=0, **options).eval()
    else:
        model = visible_build(name)
    model.reset_classifier(4)  # a default-init head: timm's Beit head starts 1000 times smaller
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter_name, p in model.named_parameters():
            if "relative_position_bias_table" in parameter_name:
                p.copy_(torch.randn(p.shape, generator=generator))
            if parameter_name.rpartition(".")[2] in ("gamma_1", "gamma_2"):  # LayerScale near 1, as in make_blocks_visible
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    return model


def _reference_ept_attention(attn: torch.nn.Module, x: torch.Tensor, call: dict, prompt: torch.Tensor):
    """EPT written out from timm's own attention weights: softmax over ``[P, scale * q.k + bias]`` with q, k
    rotated by timm's rotary function (Eva, NaFlexVit) and the bias timm's relative position bias (Beit,
    VisionTransformerRelPos), prompt columns dropped, times V, then timm's output projection."""
    batch, tokens, _ = x.shape
    q_bias = getattr(attn, "q_bias", None)
    bias = attn.qkv.bias if q_bias is None else torch.cat((q_bias, attn.k_bias, attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, bias).reshape(batch, tokens, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    rope = call.get("rope")
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)

        def rotate(t):
            rotated = timm.layers.apply_rot_embed_cat(t[:, :, npt:], rope, **({"half": True} if half else {}))
            return torch.cat([t[:, :, :npt], rotated], 2)

        q, k = rotate(q), rotate(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if getattr(attn, "relative_position_bias_table", None) is not None:
        logits = logits + attn._get_rel_pos_bias()
    if call.get("shared_rel_pos_bias") is not None:
        logits = logits + call["shared_rel_pos_bias"]
    if getattr(attn, "rel_pos", None) is not None:  # VisionTransformerRelPos: its own bias, else the shared one
        logits = logits + attn.rel_pos.get_bias()
    elif call.get("shared_rel_pos") is not None:
        logits = logits + call["shared_rel_pos"]
    d_p = prompt.shape[-1]
    columns = torch.cat([prompt.expand(*logits.shape[:-1], d_p), logits], dim=-1)
    out = (columns.softmax(dim=-1)[..., d_p:] @ v).transpose(1, 2).reshape(batch, tokens, -1)
    if getattr(attn, "norm", None) is not None:
        out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj(out)


EPT_FAMILIES = [
    *present("eva02", "vit_rope", "dinov3", "beit", "vit_relpos", "vit_srelpos", "naflexvit_rope"),
    *(["beit_shared"] if present("beit") else []),
]


@pytest.mark.parametrize("name", EPT_FAMILIES)
def test_ept_keeps_rotary_positions_and_relative_bias(name: str) -> None:
    base = _ept_family(name)
    model = promptvit.wrap(base, "ept", prompt_length=3).eval()
    x = tiny_input("beit" if name == "beit_shared" else name)
    layers = model.method.injected_layers()
    prompts = model.method.attention_prompts()
    calls = []
    handles = [
        layer.register_forward_hook(lambda m, args, kwargs, out: calls.append((m, args[0], kwargs, out)), with_kwargs=True)
        for layer in layers
    ]
    with torch.no_grad():
        for prompt in prompts:
            prompt.prompt.normal_(std=1.0)  # prompts that matter: the gate is far from 1
        model(x)
    for handle in handles:
        handle.remove()
    assert len(calls) == len(layers) == len(base.blocks)
    position_argument = {
        "eva02": "rope",
        "vit_rope": "rope",
        "dinov3": "rope",
        "naflexvit_rope": "rope",
        "beit_shared": "shared_rel_pos_bias",
        "vit_srelpos": "shared_rel_pos",
    }
    if name in position_argument:  # the block hands its positions to the prompted attention
        assert all(call.get(position_argument[name]) is not None for _, _, call, _ in calls)
    with torch.no_grad():
        for (layer, tokens, call, out), prompt in zip(calls, prompts, strict=True):
            expected = _reference_ept_attention(layer.base_layer, tokens, call, prompt.prompt)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            plain = layer.base_layer(tokens, **call)  # timm's attention: EPT's prompt must change it
            assert not torch.allclose(out, plain, atol=1e-3)


@pytest.mark.parametrize("name", EPT_FAMILIES)
@pytest.mark.parametrize("way", ["pure_cat", "add", "multiply"])
def test_ept_with_vanishing_prompts_is_timms_forward(name: str, way: str) -> None:
    base = _ept_family(name)
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, "ept", way=way, prompt_length=3).eval()
    with torch.no_grad():
        for prompt in model.method.attention_prompts():
            if way == "pure_cat":  # exp(-60) of the softmax mass on the prompt columns: the gate is 1
                prompt.prompt.fill_(-60.0)
    x = tiny_input("beit" if name == "beit_shared" else name)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- medical-backbone shapes


# each medical shape is a build of a registered family: the pairs its family refuses are the matrix's
MEDICAL_SUPPORTED = method_cases(sorted(MEDICAL_BUILDS), medical=True)[0]


@pytest.mark.parametrize("method,name", MEDICAL_SUPPORTED)
def test_medical_backbone_shapes_wrap_and_train(method: str, name: str) -> None:
    model = _wrap(method, name, medical=True)
    x = tiny_input(name, batch=4, table=MEDICAL_BUILDS)
    before = {n: p.detach().clone() for n, p in model.tuned_named_parameters()}
    _step(model, x)
    moved = {n for n, p in model.tuned_named_parameters() if not torch.equal(before[n], p)}
    assert moved, f"{method} on {name}: the step moved no tuned tensor"
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


# ---------------------------------------------------------------------- multi-task serving


@pytest.mark.parametrize("name", sorted(FAMILY_BUILDS))
def test_serving_equals_per_task_inference_on_every_family(name: str) -> None:
    """Every method the family runs, served together: batched where the family allows, per task otherwise."""
    from promptvit.serving import MultiTaskModel

    generator = torch.Generator().manual_seed(0)
    models, names = [], []
    for method in METHODS:
        if not supports(method, name):
            continue
        model = _wrap(method, name)
        with torch.no_grad():  # tuned tensors away from their (often zero) initial values
            for _, p in model.tuned_named_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
        models.append(model.eval())
        names.append(method)
    served = MultiTaskModel(visible_build(name), models, names=names)  # wrapped in place: a copy of the cached build
    x = tiny_input(name, batch=3)
    with torch.no_grad():
        out = served(x)
        for method, model in zip(names, models, strict=True):
            tolerance = promptvit.get_method(method).rounding.mixed_batch
            torch.testing.assert_close(out[method], model(x), rtol=tolerance, atol=tolerance, msg=method)


# ---------------------------------------------------------------------- frozen-prefix cut

CUT_CASES = [
    (method, options, name)
    for method, options in [("ap", {"layer": 1}), ("vpt", {"prompt_length": 2}), ("linear", {})]
    for name in sorted(FAMILY_BUILDS)
    if supports(method, name)
]


@pytest.mark.parametrize("method,options,name", CUT_CASES)
def test_forward_from_a_cached_cut_equals_the_forward(method: str, options: dict, name: str) -> None:
    """The cache's cuts (embedding + frozen blocks, or the pre-logit features) keep each family's maths."""
    if method == "ap" and family_adapter(name).kind == "cnn":
        size = FAMILY_BUILDS[name][2]
        options = {**options, "cnn_input_size": [size, size]}  # a CNN's prompt is sized for the input
    model = promptvit.wrap(visible_build(name), method, num_classes=4, **options).eval()
    with torch.no_grad():
        for _, p in model.tuned_named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    depth = model.geometry.depth
    vit = model.geometry.kind == "vit"
    assert model.cache_cut() == {"ap": 1 if vit else 0, "vpt": 0, "linear": depth}[method]
    x = tiny_input(name)
    tolerance = promptvit.get_method(method).rounding.cached
    with torch.no_grad():
        for block in sorted({1 if vit else 0, depth}):
            got = model.forward_from_block(model.forward_prefix(x, block), block)
            torch.testing.assert_close(got, model(x), rtol=0, atol=tolerance)
