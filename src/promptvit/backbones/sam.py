"""Adapter for timm ``VisionTransformerSAM`` (``samvit_*``: Segment Anything's image encoder as a classifier).

SAM's ViT keeps its tokens as a (B, H, W, C) map: most blocks attend within windows of it (padded to whole
windows), a few globally, and a convolutional neck follows the blocks. The token path of a ViT does not
carry over (there is no token sequence to put prompt tokens in, and EPT's per-token rows would have to live
in windows), so SAM is seen like Swin: stages (its blocks, from ``feature_info``) for partial tuning and
activation prompts, the pixel input for VP, and transformer blocks whose fused ``qkv`` (LoRA) and MLP
(adapter) take part as modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import nn

from promptvit.backbones.base import (
    AttentionParts,
    BackboneError,
    PartsFromCall,
    register_adapter,
    unwrap_base_layers,
)
from promptvit.backbones.generic import GenericAdapter


@register_adapter(VisionTransformerSAM)
class SAMAdapter(GenericAdapter):
    family = "VisionTransformerSAM"
    kind_note = (
        "SAM's blocks attend within windows of a 2-D token map and feed a convolutional neck, so there is no token "
        "sequence for prompt tokens; EPT would re-compute a windowed attention with decomposed relative positions, "
        "which promptvit does not"
    )
    tiny_builds = {
        # windowed blocks with SAM's decomposed relative positions, one global block, convolutional neck
        "samvit": (
            "samvit_base_patch16",
            dict(
                img_size=32,
                patch_size=4,
                embed_dim=32,
                depth=2,
                num_heads=2,
                window_size=4,
                global_attn_indexes=[1],
                neck_chans=16,
            ),
            32,
        ),
    }
    has_transformer_blocks = True

    model: VisionTransformerSAM

    def input_module(self) -> nn.Module:
        return self.model.patch_embed

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    def attention(self, block: int) -> AttentionParts:
        raise self._no_attention_parts()

    def attention_parts_from_call(self, block: int) -> PartsFromCall:
        raise self._no_attention_parts()

    def _no_attention_parts(self) -> BackboneError:
        return BackboneError(
            f"{type(self.model).__name__}'s attention adds decomposed relative positions (rel_pos_h, rel_pos_w) "
            "over each window of its 2-D map, which promptvit does not re-compute"
        )

    def stage_output_map(self, output: torch.Tensor) -> torch.Tensor:
        """A block's output is its (B, H, W, C) token map; channels first, as timm's intermediates give it."""
        return output.permute(0, 3, 1, 2)

    def block_width(self, block: int) -> int:
        return self.model.embed_dim  # the neck narrows the features after the blocks

    def qkv_slot(self, block: int, injections: Any = None) -> tuple[nn.Module, str]:
        # SAM's attention calls ``self.qkv(x)`` as a module, output [q | k | v]
        return unwrap_base_layers(self.model.blocks[block].attn), "qkv"

    def mlp_slot(self, block: int) -> tuple[nn.Module, str]:
        return self.model.blocks[block], "mlp"
