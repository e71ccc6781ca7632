"""Adapter for timm ``MaxxVit``: MaxViT (block and grid attention), CoAtNet (convolutional then transformer
stages) and MaxxViT.

Its attention runs within windows and grids of a feature map (MaxViT) or over a whole downsampled map
(CoAtNet's ``TransformerBlock2d``), between MBConv blocks: there is no token sequence for prompt tokens or
EPT's rows, so the family is seen like Swin: stages (``feature_info``) for partial tuning and activation
prompts, the stem for VP, and the transformer blocks, each with a fused ``qkv`` projection (LoRA) and an MLP
(adapter). Two timm layouts are handled where LoRA and the adapter put their layers: the projections are a
``nn.Linear`` on channels-last windows or a 1x1 ``nn.Conv2d`` on (B, C, H, W) maps, and their outputs are
laid out head by head (``head_first``, timm's default here) or as ``[q | k | v]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models import maxxvit
from timm.models.maxxvit import MaxxVit
from torch import nn

from promptvit.backbones.base import (
    AttentionParts,
    BackboneError,
    PartsFromCall,
    register_adapter,
    unwrap_base_layers,
)
from promptvit.backbones.generic import GenericAdapter

#: MaxxVit's transformer blocks: an attention and an MLP each (the parallel one of MaxxViT-v2 runs two
#: attentions, window and grid, side by side)
TRANSFORMER_BLOCKS = tuple(
    getattr(maxxvit, name)
    for name in ("TransformerBlock2d", "PartitionAttentionCl", "PartitionAttention2d", "ParallelPartitionAttention")
    if hasattr(maxxvit, name)
)

_TINY = dict(stem_width=(8, 8), transformer_dim_head=8, img_size=32, pretrained_cfg_overlay=dict(input_size=(3, 32, 32)))


@register_adapter(MaxxVit)
class MaxxVitAdapter(GenericAdapter):
    family = "MaxxVit"
    kind_note = (
        "MaxViT and CoAtNet attend within windows and grids of a feature map, or over a whole map between "
        "convolutional blocks, so there is no token sequence for prompt tokens; EPT would re-compute an attention "
        "that splits q, k and v head by head and adds a relative position bias, which promptvit does not"
    )
    tiny_builds = {
        # MaxViT: MBConv, block attention and grid attention (channels-last, linear qkv) in every stage
        "maxvit": (
            "maxvit_pico_rw_256",
            dict(
                embed_dim=(8, 16, 24),
                depths=(1, 1, 1),
                block_type=("M",) * 3,
                transformer_window_size=(2, 2),
                transformer_grid_size=(2, 2),
                **_TINY,
            ),
            32,
        ),
        # CoAtNet: two MBConv stages, then transformer stages of NCHW blocks (1x1-conv qkv and MLP)
        "coatnet": ("coatnet_pico_rw_224", dict(embed_dim=(8, 16, 24, 32), depths=(1, 1, 1, 1), **_TINY), 32),
    }
    has_transformer_blocks = True

    model: MaxxVit

    def input_module(self) -> nn.Module:
        return self.model.stem

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """Every transformer block, in the order the forward runs them (stage by stage)."""
        return [m for m in self.model.modules() if isinstance(m, TRANSFORMER_BLOCKS)]

    def block_width(self, block: int) -> int:
        """Width of the MLP's input (a CoAtNet block's attention may widen the map before it)."""
        fc1 = unwrap_base_layers(self.blocks[block].mlp).fc1
        return fc1.in_features if isinstance(fc1, nn.Linear) else fc1.in_channels

    def _attention(self, block: int) -> nn.Module:
        module = self.blocks[block]
        if not hasattr(module, "attn"):
            raise BackboneError(
                f"block {block} of {type(self.model).__name__} ({type(module).__name__}) runs a window and a grid "
                "attention side by side, each on half the channels; LoRA adapts one fused qkv per block"
            )
        return unwrap_base_layers(module.attn)

    def attention(self, block: int) -> AttentionParts:
        raise self._no_attention_parts()

    def attention_parts_from_call(self, block: int) -> PartsFromCall:
        raise self._no_attention_parts()

    def _no_attention_parts(self) -> BackboneError:
        return BackboneError(
            f"{type(self.model).__name__}'s attention splits q, k and v head by head over windows, grids or "
            "whole maps and adds a relative position bias inside its rel_pos module, which promptvit does not "
            "re-compute"
        )

    def qkv_slot(self, block: int, injections: Any = None) -> tuple[nn.Module, str]:
        return self._attention(block), "qkv"  # called as a module in every MaxxVit attention

    def qkv_head_first(self, block: int) -> int:
        attn = self._attention(block)
        return int(attn.num_heads) if attn.head_first else 0

    def mlp_slot(self, block: int) -> tuple[nn.Module, str]:
        return self.blocks[block], "mlp"
