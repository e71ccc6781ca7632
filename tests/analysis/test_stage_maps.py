"""Layer-wise representations of staged families: one entry per channel of each stage, whatever the layout.

Swin's stages give (B, H, W, C) maps and, with token prompts, carry the prompts as extra rows under the map;
a CNN's give (B, C, H, W). The per-layer representation CKA reads must be the mean of the stage's image
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
from tests.families import FAMILY_BUILDS, build, family_input, make_blocks_visible

# Every staged family's tiny builds, from the adapters' registry: a new family is checked with no edit here.
STAGED = [
    name
    for adapter in dict.fromkeys(registered_adapters().values())
    if adapter.kind == "cnn"
    for name in adapter.tiny_builds
    if name in FAMILY_BUILDS
]
# Families that carry token prompts through their stages themselves (Swin's prompt rows).
PROMPT_ROUTES = [name for name in STAGED if adapter_for(build(FAMILY_BUILDS, name)).routes_token_prompts]


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
    model = build(FAMILY_BUILDS, name)
    images = family_input(FAMILY_BUILDS, name, batch=3)
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
def test_prompt_rows_stay_out_of_stage_representations(name: str) -> None:
    """VPT on Swin: the prompts travel as rows under each stage's map; the representation is the mean over
    the image positions only (timm's map size), and at the last stage equals the patch part of what the
    final norm receives as ``[prompts, patches]``."""
    length = 5  # more than one row of the last stage's map: padded rows as well
    backbone = make_blocks_visible(build(FAMILY_BUILDS, name))
    images = family_input(FAMILY_BUILDS, name, batch=3)
    plain = _timm_stage_maps(copy.deepcopy(backbone), images)
    model = promptvit.wrap(backbone, "vpt", num_classes=3, prompt_length=length, dropout=0.0)
    stages = adapter_for(model.backbone).stages
    outputs: dict[int, torch.Tensor] = {}
    final_tokens: list[torch.Tensor] = []
    handles = [
        stage.register_forward_hook(lambda m, a, out, i=index: outputs.__setitem__(i, out.detach()))
        for index, stage in enumerate(stages)
    ]
    handles.append(model.backbone.norm.register_forward_pre_hook(lambda m, args: final_tokens.append(args[0])))
    try:
        reps = layer_representations(model, images)
    finally:
        for handle in handles:
            handle.remove()
    for index, (channels, stage_map) in plain.items():
        height, width = stage_map.shape[2:]
        packed = outputs[index]
        assert packed.shape[1:] == (height + -(-length // width), width, channels)  # the prompt rows are there
        assert reps[index].shape == (3, channels)
        patches = packed[:, :height].permute(0, 3, 1, 2)
        torch.testing.assert_close(torch.from_numpy(reps[index]), patches.mean((2, 3)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(torch.from_numpy(reps[index]), packed.mean((1, 2)), atol=1e-4)
    last = final_tokens[-1].squeeze(1)  # (B, P + H * W, C)
    assert last.shape[1] == length + plain[len(stages) - 1][1][0, 0].numel()
    torch.testing.assert_close(torch.from_numpy(reps[-1]), last[:, length:].mean(1), rtol=1e-5, atol=1e-5)
