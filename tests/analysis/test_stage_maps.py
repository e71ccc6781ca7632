"""Layer-wise representations of staged families: one entry per channel of each stage, whatever the layout.

Swin's stages give (B, H, W, C) maps (with token prompts, beside the map); a CNN's give (B, C, H, W). The per-layer representation CKA reads must be the mean of the stage's image
positions per channel in every case, pinned against timm's own ``forward_intermediates``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import promptvit
from promptvit.analysis import layer_representations
from promptvit.backbones import adapter_for, registered_adapters
from tests.families import FAMILY_BUILDS, build_tiny, make_blocks_visible, tiny_input

# Every staged family's tiny builds, from the adapters' registry: a new family is checked with no edit here.
STAGED = [
    name
    for adapter in dict.fromkeys(registered_adapters().values())
    if adapter.kind == "cnn"
    for name in adapter.tiny_builds
    if name in FAMILY_BUILDS
]
# Families that carry token prompts through their stages themselves (Swin).
PROMPT_ROUTES = [name for name in STAGED if adapter_for(build_tiny(name)).routes_token_prompts]


def _timm_stage_maps(model: nn.Module, images: torch.Tensor) -> dict[int, tuple[int, torch.Tensor]]:
    """Stage index -> (channels, timm's own (B, C, H, W) intermediate), for the stages in ``feature_info``."""
    names = {id(module): name for name, module in model.named_modules()}
    stage_of = {names[id(stage)]: index for index, stage in enumerate(adapter_for(model).stages)}
    with torch.no_grad():
        maps = model.forward_intermediates(images, intermediates_only=True)
    # timm 1.0.9's ConvNeXt puts its stem first without listing it in feature_info: match from the end
    info = model.feature_info
    assert len(maps) >= len(info)
    maps = maps[len(maps) - len(info) :]
    assert [m.shape[1] for m in maps] == [entry["num_chs"] for entry in info]
    return {
        stage_of[entry["module"]]: (entry["num_chs"], feature_map)
        for entry, feature_map in zip(info, maps, strict=True)
        if entry["module"] in stage_of
    }


@pytest.mark.parametrize("name", STAGED)
def test_stage_representations_are_timms_feature_maps_pooled_per_channel(name: str) -> None:
    model = build_tiny(name)
    if not hasattr(model, "forward_intermediates"):  # timm 1.0.9's DenseNet: no reference to pin against
        pytest.skip(f"this timm's {type(model).__name__} has no forward_intermediates")
    images = tiny_input(name, batch=3)
    reps = layer_representations(model, images)
    reference = _timm_stage_maps(model, images)
    stages = adapter_for(model).stages
    assert len(reps) == len(stages) and len(stages) - 1 in reference  # the last stage at least is pinned
    for index, (channels, feature_map) in reference.items():
        assert reps[index].shape == (3, channels) == (3, feature_map.shape[1]), (name, index)
        torch.testing.assert_close(torch.from_numpy(reps[index]), feature_map.mean((2, 3)), rtol=1e-5, atol=1e-5)
    flat = layer_representations(model, images, pooling="flatten")
    for index, (_, feature_map) in reference.items():  # channels first, as timm's NCHW maps
        torch.testing.assert_close(torch.from_numpy(flat[index]), feature_map.flatten(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PROMPT_ROUTES)
def test_prompt_tokens_stay_out_of_stage_representations(name: str) -> None:
    """VPT on Swin: a stage with prompts runs block by block (its module's hooks do not fire) and reports its
    map through the block plan. Every stage gets a representation over its image positions only; at the last
    stage it equals the patch part of what the final norm receives as ``[prompts, patches]``, and the
    prompts changed it (compared with the same weights without them)."""
    length = 5
    backbone = make_blocks_visible(build_tiny(name))
    images = tiny_input(name, batch=3)
    plain = _timm_stage_maps(copy.deepcopy(backbone), images)
    model = promptvit.wrap(backbone, "vpt", num_classes=3, prompt_length=length, dropout=0.0)
    final_tokens: list[torch.Tensor] = []
    handle = model.backbone.norm.register_forward_pre_hook(lambda m, args: final_tokens.append(args[0]))
    try:
        reps = layer_representations(model, images)
    finally:
        handle.remove()
    assert len(reps) == len(adapter_for(model.backbone).stages)
    for index, (channels, feature_map) in plain.items():
        assert reps[index].shape == (3, channels), (name, index)
        assert not torch.allclose(torch.from_numpy(reps[index]), feature_map.mean((2, 3)), atol=1e-4)
    last = final_tokens[-1].squeeze(1)  # (B, P + H * W, C)
    assert last.shape[1] == length + plain[len(reps) - 1][1][0, 0].numel()
    torch.testing.assert_close(torch.from_numpy(reps[-1]), last[:, length:].mean(1), rtol=1e-5, atol=1e-5)
