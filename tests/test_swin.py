"""Swin and SwinV2: window attention parts, prompt tokens in every window (VPT, SPT), EPT on windows.

References are written out from timm's own weights with an explicit softmax: the window attention of timm's
``WindowAttention`` (Swin: scaled dot product plus the relative position bias table; SwinV2: cosine attention
with its clamped logit scale, the continuous position bias MLP and the q/v biases), and the VPT authors'
prompted block (docs/methods.md, "VPT on Swin") per image.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import window_partition, window_reverse

import promptvit
from promptvit.backbones import adapter_for, attend
from promptvit.backbones import swin as swin_module
from promptvit.backbones.swin import SwinAdapter
from promptvit.layers.prompted_attention import PromptedAttention
from tests.families import FAMILY_BUILDS, build, family_input, make_blocks_visible

FAMILIES = ["swin", "swinv2"]


def _base(name: str, seed: int = 0) -> torch.nn.Module:
    model = make_blocks_visible(build(FAMILY_BUILDS, name, num_classes=4, seed=seed), seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # position biases away from their (near) zero init, so that padding them shows
        for parameter_name, p in model.named_parameters():
            if "relative_position_bias_table" in parameter_name:
                p.copy_(torch.randn(p.shape, generator=generator))
            if parameter_name.endswith(("q_bias", "v_bias")):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def _post_norm(name: str) -> bool:
    return name == "swinv2"


#: position bias of prompts to and from every token: the authors' 0 on Swin, 16 * sigmoid(0) on SwinV2
PROMPT_BIAS = {"swin": 0.0, "swinv2": 8.0}


def _qkv(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is None:
        return attn.qkv(x)
    return F.linear(x, attn.qkv.weight, torch.cat((q_bias, torch.zeros_like(q_bias), attn.v_bias)))


def _logits_and_position_bias(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple:
    """timm's logits (before bias and mask) and its relative position bias (heads, N, N)."""
    area = attn.window_size[0] * attn.window_size[1]
    index = attn.relative_position_index.view(-1)
    if hasattr(attn, "cpb_mlp"):  # SwinV2: cosine attention, continuous position bias
        scale = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp()
        logits = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * scale
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
        bias = 16 * torch.sigmoid(table[index].view(area, area, -1).permute(2, 0, 1))
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        bias = attn.relative_position_bias_table[index].view(area, area, -1).permute(2, 0, 1)
    return logits, bias


def _reference_prompted_block(block, x, prompts, post_norm: bool, prompt_bias: float):
    """The authors' prompted Swin block for a (B, H, W, C) map and (B, P, C) prompts of each image: the image's
    prompts in front of each of its windows, position bias ``prompt_bias`` (the authors': 0) and zero shift
    mask from and to them, their outputs averaged over the image's windows; residuals, norms and MLP on
    prompts and patches alike."""
    batch, height, width, channels = x.shape
    count = prompts.shape[1]
    attn = block.attn
    heads = attn.num_heads
    tokens = torch.cat([prompts, x.reshape(batch, -1, channels)], dim=1)
    inputs = tokens if post_norm else block.norm1(tokens)
    shift, size = block.shift_size, block.window_size
    patches = inputs[:, count:].reshape(batch, height, width, channels)
    if any(shift):
        patches = torch.roll(patches, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = window_partition(patches, size).reshape(batch, -1, size[0] * size[1], channels)
    num_windows, area = windows.shape[1], windows.shape[2]
    n = count + area
    sequence = torch.cat([inputs[:, None, :count].expand(batch, num_windows, count, channels), windows], dim=2)
    q, k, v = _qkv(attn, sequence).reshape(batch, num_windows, n, 3, heads, -1).permute(3, 0, 1, 4, 2, 5)
    logits, position_bias = _logits_and_position_bias(attn, q, k)
    bias = torch.full((num_windows, heads, n, n), prompt_bias)
    bias[:, :, count:, count:] = position_bias
    if block.attn_mask is not None:
        bias[:, :, count:, count:] += block.attn_mask[:, None]
    out = ((logits + bias).softmax(dim=-1) @ v).transpose(2, 3).reshape(batch, num_windows, n, channels)
    out = attn.proj(out)
    prompt_out = out[:, :, :count].mean(dim=1)
    patches = window_reverse(out[:, :, count:].reshape(-1, size[0], size[1], channels), size, height, width)
    if any(shift):
        patches = torch.roll(patches, shifts=shift, dims=(1, 2))
    out = torch.cat([prompt_out, patches.reshape(batch, -1, channels)], dim=1)
    tokens = tokens + (block.norm1(out) if post_norm else out)
    tokens = tokens + (block.norm2(block.mlp(tokens)) if post_norm else block.mlp(block.norm2(tokens)))
    return tokens[:, count:].reshape(batch, height, width, channels), tokens[:, :count]


def _record_prompted_blocks(monkeypatch: pytest.MonkeyPatch) -> dict:
    """block module -> (map in, prompts in, map out, prompts out) of every prompted block the loop runs."""
    calls = {}
    original = SwinAdapter.prompted_block

    def recording(self, block, x, prompts, keep_prompts):
        out = original(self, block, x, prompts, keep_prompts)
        calls[block] = (x, prompts, *out)
        return out

    monkeypatch.setattr(SwinAdapter, "prompted_block", recording)
    return calls


def _block_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every block of a plain Swin for images ``x``."""
    adapter = adapter_for(model)
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in adapter.blocks]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


# ---------------------------------------------------------------------- window attention parts


@pytest.mark.parametrize("name", FAMILIES)
def test_window_attention_parts_reproduce_timms_window_attention(name: str) -> None:
    model = _base(name)
    adapter = adapter_for(model)
    calls = []
    handles = [
        b.attn.register_forward_hook(lambda m, a, kw, out: calls.append((m, a[0], kw, out)), with_kwargs=True)
        for b in adapter.blocks
    ]
    with torch.no_grad():
        model(family_input(FAMILY_BUILDS, name, batch=3))
    for handle in handles:
        handle.remove()
    assert any(call.get("mask") is not None for _, _, call, _ in calls)  # a shifted block with several windows
    parts_from_call = adapter.attention_parts_from_call(0)
    with torch.no_grad():
        for attn, windows, call, out in calls:
            torch.testing.assert_close(attend(parts_from_call(attn, call), windows), out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- prompt tokens in every window


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("block", [0, 1, 2], ids=["window", "shifted", "next_stage"])
def test_prompted_block_is_the_authors_computation(name: str, block: int) -> None:
    model = _base(name)
    adapter = adapter_for(model)
    x = _block_inputs(model, family_input(FAMILY_BUILDS, name, batch=2))[block]
    generator = torch.Generator().manual_seed(3)
    prompts = torch.randn(2, 3, x.shape[-1], generator=generator)  # different prompts per image
    module = adapter.blocks[block]
    with torch.no_grad():
        got_map, got_prompts = adapter.prompted_block(module, x, prompts, keep_prompts=True)
        want_map, want_prompts = _reference_prompted_block(module, x, prompts, _post_norm(name), PROMPT_BIAS[name])
        torch.testing.assert_close(got_map, want_map, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_prompts, want_prompts, rtol=1e-5, atol=1e-5)
        # without prompt outputs (the next block drops them) the map is the same
        skipped_map, none = adapter.prompted_block(module, x, prompts, keep_prompts=False)
        torch.testing.assert_close(skipped_map, got_map, rtol=1e-5, atol=1e-6)
        assert none.shape[1] == 0
        plain = module(x)  # the prompts do change what the patches attend to
        assert not torch.allclose(got_map, plain, atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_prompts_change_only_their_windows_attention_inputs(name: str, monkeypatch) -> None:
    """Deep VPT: every window attention sees timm's own window tokens of the block input, plus the block's
    prompts (normed like every token on Swin) in front, the same in every window of an image."""
    base = _base(name)
    plain = copy.deepcopy(base)
    model = promptvit.wrap(base, "vpt", prompt_length=3, deep=True).eval()
    adapter = adapter_for(model.backbone)
    calls = _record_prompted_blocks(monkeypatch)
    attention_inputs = {}
    handles = [
        block.attn.qkv.register_forward_pre_hook(lambda m, a, i=index: attention_inputs.__setitem__(i, a[0]))
        for index, block in enumerate(adapter.blocks)
    ]
    x = family_input(FAMILY_BUILDS, name, batch=2)
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    inputs = {index: calls[block][0] for index, block in enumerate(adapter.blocks)}
    plain_adapter = adapter_for(plain)
    for index, block in enumerate(plain_adapter.blocks):
        windows = []  # timm's own window tokens (SwinV2 does not call its qkv as a module)
        handle = block.attn.register_forward_pre_hook(lambda m, a, seen=windows: seen.append(a[0]))
        with torch.no_grad():
            block(inputs[index])  # every deep block's input holds patches only: the previous prompts were dropped
        handle.remove()
        seen = attention_inputs[index]
        assert seen.shape[1] == 3 + windows[0].shape[1]
        torch.testing.assert_close(seen[:, 3:], windows[0], rtol=1e-6, atol=1e-6)
        per_image = seen[:, :3].reshape(2, -1, 3, seen.shape[-1])
        assert torch.equal(per_image, per_image[:, :1].expand_as(per_image))  # the same in every window
        prompts = model.method.prompts[index]
        expected = prompts if _post_norm(name) else block.norm1(prompts)
        with torch.no_grad():
            torch.testing.assert_close(per_image[0, 0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_zeroed_and_masked_out_prompts_leave_every_patch_token_as_timm_computes_it(name: str, monkeypatch) -> None:
    base = _base(name)
    plain = copy.deepcopy(base)
    model = promptvit.wrap(base, "vpt", prompt_length=3, deep=True).eval()
    with torch.no_grad():
        for block in range(len(model.method.prompts)):
            model.method.prompts[block].zero_()

    def masked_out(bias: torch.Tensor, count: int, value: float) -> torch.Tensor:
        bias = F.pad(bias, (count, 0, count, 0))
        return torch.cat([torch.full_like(bias[..., :count], float("-inf")), bias[..., count:]], dim=-1)

    monkeypatch.setattr(swin_module, "prompt_logit_bias", masked_out)
    x = family_input(FAMILY_BUILDS, name, batch=2)
    with torch.no_grad():
        features = model.forward_features(x)  # (B, 1, prompts + patches, C): the final norm saw both
        expected = plain.forward_features(x)
    assert features.shape[2] == 3 + expected.shape[1] * expected.shape[2]
    torch.testing.assert_close(features[:, 0, 3:], expected.flatten(1, 2), rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    with torch.no_grad():  # the prompts themselves do change the patch tokens
        assert not torch.allclose(model.forward_features(x)[:, 0, 3:], expected.flatten(1, 2), atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_shallow_prompts_pass_patch_merging_and_reach_the_pooling(name: str, monkeypatch) -> None:
    model = promptvit.wrap(_base(name), "vpt", prompt_length=3, deep=False).eval()
    adapter = adapter_for(model.backbone)
    blocks, stages = adapter.blocks, adapter.stages
    calls = _record_prompted_blocks(monkeypatch)
    x = family_input(FAMILY_BUILDS, name, batch=2)
    with torch.no_grad():
        features = model.forward_features(x)
    last_of_first_stage, first_of_next = stages[0].blocks[-1], stages[1].blocks[0]
    leaving = calls[last_of_first_stage][3]  # prompt outputs of the first stage's last block
    arriving = calls[first_of_next][1]  # prompt inputs of the next stage's first block
    merging = stages[1].downsample
    # timm's own patch merging of a map whose 2x2 neighbourhoods all hold the same prompt
    replicated = leaving[:, :, None, None, :].expand(2, 3, 2, 2, leaving.shape[-1]).reshape(2, 6, 2, -1)
    with torch.no_grad():
        merged = type(merging).forward(merging, replicated)  # timm's forward, not the route's
        torch.testing.assert_close(arriving, merged.reshape(2, 3, -1), rtol=1e-6, atol=1e-6)
        # the final norm sees [prompts, patches]; the head averages over both
        last_prompts = calls[blocks[-1]][3]
        norm = model.backbone.norm
        torch.testing.assert_close(features[:, 0, :3], type(norm).forward(norm, last_prompts))
        torch.testing.assert_close(model.forward_prefix(x, model.geometry.depth), features.mean(dim=(1, 2)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_an_images_prediction_does_not_depend_on_the_rest_of_its_batch(name: str) -> None:
    """Each image's prompts go only into its own windows (the authors' reshape pairs prompts and windows of
    different images once a batch holds several; docs/methods.md, VPT on Swin)."""
    model = promptvit.wrap(_base(name), "vpt", prompt_length=3, deep=False).eval()
    x = family_input(FAMILY_BUILDS, name, batch=3)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_prompts_follow_each_stage_width_and_vpts_bound(name: str) -> None:
    model = promptvit.wrap(_base(name), "vpt", prompt_length=5, deep=True)
    adapter = adapter_for(model.backbone)
    widths = [adapter.block_width(i) for i in range(len(adapter.blocks))]
    _, options, _ = FAMILY_BUILDS[name]
    assert widths == [16, 16, 32] and options["embed_dim"] == 16
    assert [tuple(model.method.prompts[i].shape) for i in range(3)] == [(5, w) for w in widths]
    assert model.parameter_summary()["method"] == 5 * sum(widths)
    bound = math.sqrt(6 / (3 * 4 * 4 + 16))  # patch 4, the first stage's width, for every stage
    assert all(model.method.prompts[i].abs().max() <= bound for i in range(3))
    assert model.method.prompts[2].abs().max() > 0.8 * bound
    shallow = promptvit.wrap(_base(name), "vpt", prompt_length=5, deep=False)
    assert shallow.parameter_summary()["method"] == 5 * widths[0]


def test_frozen_prompts_are_saved_and_loaded_with_the_artifact(tmp_path) -> None:
    model = promptvit.wrap(_base("swin"), "vpt", prompt_length=2, frozen_prompts=True).eval()
    assert model.parameter_summary()["method"] == 0
    saved = set(model.tuned_state_dict())
    assert {f"method.prompts.{i}" for i in range(3)} <= saved  # buffers of each block's width
    x = family_input(FAMILY_BUILDS, "swin")
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "artifact")
    torch.manual_seed(123)  # a fresh wrap draws other prompts: only the artifact's give the same logits
    loaded = promptvit.load(tmp_path / "artifact", base_model=_base("swin")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.skipif(
    not hasattr(timm.layers, "use_reentrant_ckpt") or timm.layers.use_reentrant_ckpt(),
    reason="this timm checkpoints re-entrantly: parameters used in a block whose input needs no gradient get "
    "none (every method, on every family)",
)
@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_checkpointing_gives_the_same_logits_and_gradients(name: str) -> None:
    x = family_input(FAMILY_BUILDS, name, batch=2)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same prompts
        model = promptvit.wrap(_base(name), "vpt", prompt_length=3, deep=False, dropout=0.0)
        model.backbone.set_grad_checkpointing(checkpointing)
        model.train()
        logits = model(x)
        logits.square().sum().backward()
        results.append((logits.detach(), [p.grad.clone() for _, p in model.tuned_named_parameters()]))
    (plain, plain_grads), (checkpointed, grads) = results
    torch.testing.assert_close(checkpointed, plain)
    assert plain_grads[0].abs().sum() > 0
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", FAMILIES)
def test_spt_prompts_are_tokens_their_block_receives(name: str) -> None:
    base = _base(name)
    x = family_input(FAMILY_BUILDS, name, batch=3)
    received = [t.flatten(1, 2).reshape(-1, t.shape[-1]) for t in _block_inputs(copy.deepcopy(base), x)]
    model = promptvit.wrap(base, "spt", prompt_length=2)
    info = model.method.initialize_from_data(model, [(x, torch.zeros(3, dtype=torch.long))])
    assert info["spt_images"] == 3
    for block, tokens in enumerate(received):
        prompts = model.method.prompts[block].detach()
        assert prompts.shape == (2, tokens.shape[-1])
        distances = torch.cdist(prompts, tokens, compute_mode="donot_use_mm_for_euclid_dist")
        assert (distances.min(dim=1).values < 1e-5).all(), block


# ---------------------------------------------------------------------- EPT on window attention


def _reference_ept_window_attention(attn, windows, mask, prompt):
    """EPT on one window attention call from timm's weights: softmax over ``[P, u]`` per query, u = timm's
    logits + position bias (+ the window's shift mask), prompt columns dropped, times V, projected."""
    rows, area, channels = windows.shape
    q, k, v = _qkv(attn, windows).reshape(rows, area, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits, bias = _logits_and_position_bias(attn, q, k)
    logits = logits + bias
    if mask is not None:
        logits = (logits.view(-1, mask.shape[0], *logits.shape[1:]) + mask[:, None]).flatten(0, 1)
    d_p = prompt.shape[-1]
    columns = torch.cat([prompt.expand(*logits.shape[:-1], d_p), logits], dim=-1)
    out = (columns.softmax(dim=-1)[..., d_p:] @ v).transpose(1, 2).reshape(rows, area, channels)
    return attn.proj(out)


@pytest.mark.parametrize("name", FAMILIES)
def test_ept_prompts_each_window_position_as_the_reference(name: str) -> None:
    model = promptvit.wrap(_base(name), "ept", prompt_length=3).eval()
    layers = model.method.injected_layers()
    assert [layer.num_tokens for layer in layers] == [16, 16, 16]  # 4x4 windows in every stage
    assert model.parameter_summary()["method"] == 3 * 16 * 3
    calls = []
    handles = [
        layer.register_forward_hook(lambda m, a, kw, out: calls.append((m, a[0], kw, out)), with_kwargs=True)
        for layer in layers
    ]
    with torch.no_grad():
        for layer in layers:  # prompt logits as large as SwinV2's (position bias up to 16): the gate is far from 1
            layer.prompts["default"].prompt.normal_(mean=15.0, std=1.0)
        model(family_input(FAMILY_BUILDS, name, batch=2))
    for handle in handles:
        handle.remove()
    assert any(call.get("mask") is not None for _, _, call, _ in calls)
    with torch.no_grad():
        for layer, windows, call, out in calls:
            assert isinstance(layer, PromptedAttention)
            prompt = layer.prompts["default"].prompt
            expected = _reference_ept_window_attention(layer.base_layer, windows, call.get("mask"), prompt)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out, layer.base_layer(windows, **call), atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_ept_with_vanishing_prompts_is_timms_forward(name: str) -> None:
    base = _base(name)
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, "ept", prompt_length=3).eval()
    with torch.no_grad():
        for prompt in model.method.attention_prompts():
            prompt.prompt.fill_(-60.0)
        x = family_input(FAMILY_BUILDS, name)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_ept_relative_length_is_refused_on_swin() -> None:
    with pytest.raises(promptvit.ConfigError, match="relative_length.*prompt_length"):
        promptvit.wrap(_base("swin"), "ept", relative_length=1.0)


# ---------------------------------------------------------------------- SwinV2's q/v biases and LoRA


def test_swinv2_lora_switches_to_timms_separate_bias_and_back() -> None:
    model = promptvit.wrap(_base("swinv2"), "lora", num_classes=4)
    attn = adapter_for(model.backbone).blocks[0].attn
    assert attn.qkv_bias_separate  # otherwise timm's F.linear would bypass the LoRA layer on qkv
    with model.disable_adapter():
        assert not attn.qkv_bias_separate
    assert not model.unload().layers[0].blocks[0].attn.qkv_bias_separate
