"""Adapter for timm ``VisionTransformerRelPos`` (``vit_relpos_*``, ``vit_srelpos_*``: relative position bias).

A ViT without absolute positions: the patch tokens (and a class token, if any) go through blocks whose
attention adds a relative position bias, one per block (``attn.rel_pos``, a bias table or an MLP over log
coordinates) or one shared by all (``model.shared_rel_pos``, handed to every block as ``shared_rel_pos``).
Prompt tokens go after the class token with a **zero** bias towards and from every token, as on BEiT: while a
token-prompt method is attached, ``rel_pos.get_bias`` (timm's public call) is replaced by one that pads the
bias, and a pre-hook pads the shared bias (the model's block loop hands it to every block); both are entries
of the method's ledger, shared by every token-prompt adapter. The blocks are pre-norm
(``RelPosBlock``) or post-norm (``ResPostRelPosBlock``, the ``*_rpn_*`` models); methods that change only the
attention's ``qkv`` or the MLP run on both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

from promptvit.backbones.base import (
    AttentionParts,
    BackboneError,
    PartsFromCall,
    TimmTokenAdapter,
    register_adapter,
    unwrap_base_layers,
)
from promptvit.backbones.beit import ZeroBiasForInsertedTokens
from promptvit.backbones.geometry import Geometry
from promptvit.backbones.vit import mlp_hidden_width, timm_attention_parts

_TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def relative_bias_attention_parts(attn: nn.Module, call: dict[str, Any]) -> AttentionParts:
    """The parts of a ``RelPosAttention`` for one call: its own bias, or else the shared one of the call.

    As timm: a block with its own ``rel_pos`` ignores the shared bias (timm builds one or the other).
    """
    bias = attn.rel_pos.get_bias() if attn.rel_pos is not None else call.get("shared_rel_pos")
    return dataclasses.replace(timm_attention_parts(attn), logit_bias=bias)


@register_adapter(VisionTransformerRelPos)
class RelPosViTAdapter(TimmTokenAdapter):
    family = "VisionTransformerRelPos"
    tiny_builds = {
        # a bias table per block, class token, fc_norm after average pooling
        "vit_relpos": ("vit_relpos_base_patch16_clsgap_224", _TINY, 16),
        # one log-coordinate MLP bias shared by all blocks, no class token
        "vit_srelpos": ("vit_srelpos_small_patch16_224", _TINY, 16),
        # post-norm blocks
        "vit_relpos_rpn": ("vit_relpos_small_patch16_rpn_224", _TINY, 16),
    }

    model: VisionTransformerRelPos

    def geometry(self) -> Geometry:
        block = self.model.blocks[0]
        attn = unwrap_base_layers(block.attn)
        return self.token_geometry(
            num_heads=int(attn.num_heads),
            mlp_hidden=mlp_hidden_width(block.mlp),
            qkv_bias=unwrap_base_layers(attn.qkv).bias is not None,
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.patch_embed(images)
        if model.cls_token is not None:
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x

    def block_arguments(self, image_size: tuple[int, int] | None = None) -> Callable[[int], dict[str, Any]]:
        shared = self.model.shared_rel_pos.get_bias() if self.model.shared_rel_pos is not None else None
        return lambda index: {"shared_rel_pos": shared}

    def attention(self, block: int) -> AttentionParts:
        raise BackboneError(
            f"{type(self.model).__name__} adds a relative position bias inside its attention; "
            "it has no plain attention parts"
        )

    def attention_parts_from_call(self, block: int) -> PartsFromCall:
        return relative_bias_attention_parts

    def qkv_slot(self, block: int, injections: Any = None) -> tuple[nn.Module, str]:
        return unwrap_base_layers(self.model.blocks[block].attn), "qkv"

    def tuned_with_last_blocks(self) -> list[nn.Module]:
        return [self.model.norm, self.model.fc_norm]

    def prefix_state_names(self, cut: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        stem = ("patch_embed.", "cls_token", "shared_rel_pos.")
        return stem, tuple(f"blocks.{i}." for i in range(cut))

    def prefix_modules(self, cut: int) -> list[nn.Module]:
        model = self.model
        return [model.patch_embed, model.shared_rel_pos, *model.blocks[:cut]]

    def prepare_inserted_tokens(self, injections: Any) -> None:
        tokens = self.model.num_prefix_tokens + self.model.patch_embed.num_patches
        for block in self.model.blocks:
            attn = unwrap_base_layers(block.attn)
            own = attn.rel_pos.get_bias if attn.rel_pos is not None else None
            padding = ZeroBiasForInsertedTokens(own, self.prompt_position, tokens, shared_keyword="shared_rel_pos")
            # keyed: every token-prompt adapter needs them once (the first one's padding serves all)
            injections.pre_hook(attn, padding.count_and_pad_shared, with_kwargs=True, key="inserted tokens")
            injections.hook(attn, padding.reset, key="inserted tokens")
            if own is not None:
                injections.replace(attn.rel_pos, "get_bias", padding.padded_own_bias, key="inserted tokens")
