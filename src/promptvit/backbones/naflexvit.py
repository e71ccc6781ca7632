"""Adapter for timm ``NaFlexVit`` (SigLIP 2 NaFlex and timm's NaFlex ViTs; timm >= 1.0.16).

NaFlexVit is a ViT whose embedding module (``embeds``) patchifies images of any size: the position embedding
(learned or factorised) is resampled to each image grid, or the blocks rotate queries and keys by the grid's
rotary table. The model's block loop runs it on image tensors of any size (the rotary table for the grid of
the images goes to every block as ``rope``).

Prompt tokens are prefix tokens: they go after the class and register tokens and get no position (no position
embedding; on rotary blocks the rotation is restricted to the patch tokens as on Eva, an entry of the method's
ledger). Methods that learn one tensor row per token (EPT, VP's token mode, AP) need a fixed token count: they
are sized for the input size of the model's pretrained config and run on images of that size.

timm's pre-patchified NaFlex batches (``{"patches", "patch_coord", "patch_valid"}``, each sample with its own
mask) are not taken by a wrapped model: its block loop carries no per-sample masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from promptvit.backbones.base import (
    AttentionParts,
    BackboneError,
    PartsFromCall,
    TimmTokenAdapter,
    register_adapter,
    unwrap_base_layers,
)
from promptvit.backbones.eva import rotary_attention_parts, rotate_patches_only, switch_to_module_call
from promptvit.backbones.generic import timm_recorded_options
from promptvit.backbones.geometry import Geometry
from promptvit.backbones.vit import mlp_hidden_width, timm_attention_parts

try:
    from timm.models.naflexvit import NaFlexVit
except ImportError:  # timm < 1.0.16: no NaFlexVit, nothing to register
    NaFlexVit = None

# NaFlexVit takes any image size; per-token prompts are sized for its pretrained config's input size
_TINY = dict(
    patch_size=4,
    embed_dim=32,
    depth=2,
    num_heads=2,
    pos_embed_grid_size=(4, 4),
    pretrained_cfg_overlay=dict(input_size=(3, 16, 16)),
)


def naflex_attention_parts(attn: nn.Module, call: dict[str, Any]) -> AttentionParts:
    """The parts of a NaFlexVit block's attention for one call: timm's plain ``Attention``, or on blocks with
    rotary positions the EVA attention, rotated by the call's ``rope`` (prefix tokens unrotated)."""
    if hasattr(attn, "num_prefix_tokens"):  # timm's EvaAttention: rotary positions, maybe q/v biases
        return rotary_attention_parts(attn, call)
    return timm_attention_parts(attn)


@register_adapter(*([NaFlexVit] if NaFlexVit is not None else []))
class NaFlexVitAdapter(TimmTokenAdapter):
    family = "NaFlexVit"
    tiny_builds = {
        # SigLIP 2 NaFlex: learned position embedding resampled per grid, attention-pool (map) readout
        "naflexvit_siglip": ("naflexvit_base_patch16_siglip", _TINY, 16),
        # 4 register tokens, LayerScale, average pooling with fc_norm
        "naflexvit_gap": ("naflexvit_base_patch16_gap", _TINY, 16),
        # rotary positions instead of a position embedding (EVA blocks), class token
        "naflexvit_rope": (
            "naflexvit_base_patch16_gap",
            dict(_TINY, rope_type="axial", pos_embed="none", class_token=True, global_pool="token"),
            16,
        ),
    }

    model: nn.Module  # timm's NaFlexVit

    # ------------------------------------------------------------------ geometry

    def _img_size(self) -> tuple[int, int]:
        """The size the model was built for, else its pretrained config's: what per-token prompts are sized for."""
        size = self.model.embeds.default_img_size
        if size is None:
            size = ((getattr(self.model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))[1:]
        return int(size[0]), int(size[1])

    def geometry(self) -> Geometry:
        model = self.model
        block = model.blocks[0]
        attn = unwrap_base_layers(block.attn)
        qkv = getattr(attn, "qkv", None)
        patch = tuple(int(p) for p in model.embeds.patch_size)
        img_size = self._img_size()
        pos_embed = getattr(model.embeds, "pos_embed", None)
        return Geometry(
            kind="vit",
            architecture=type(model).__name__,
            embed_dim=model.embed_dim,
            depth=len(model.blocks),
            num_heads=int(attn.num_heads),
            num_prefix_tokens=model.num_prefix_tokens,
            num_patches=(img_size[0] // patch[0]) * (img_size[1] // patch[1]),
            img_size=img_size,
            patch_size=patch,
            mlp_hidden=mlp_hidden_width(block.mlp),
            qkv_bias=qkv is not None and unwrap_base_layers(qkv).bias is not None,
            global_pool=model.global_pool,
            dynamic_img_size=True,  # any image size (positions resampled to its grid)
            class_token=bool(model.has_class_token),
            pos_embed_len=pos_embed.numel() // model.embed_dim if pos_embed is not None else 0,
        )

    def observed_options(self) -> dict[str, Any]:
        """What timm recorded of the model's build (its options overlay ``NaFlexVitCfg``), and the input size
        of its pretrained config, which per-token prompts are sized for."""
        return {
            **timm_recorded_options(self.model),
            "num_classes": int(self.model.num_classes),
            "pretrained_cfg_overlay": {"input_size": [3, *self._img_size()]},
        }

    # ------------------------------------------------------------------ token path

    def input_module(self) -> nn.Module:
        return self.model.embeds

    @property
    def patch_embed(self) -> nn.Module:
        """The projection's norm: its output is the (B, N, d) patch tokens before any position embedding."""
        return self.model.embeds.norm

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.embeds.patch_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.model.embeds(images)
        return self.model.norm_pre(tokens)

    def _rope(self, image_size: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The rotary table of the grid of ``image_size`` images (default: the model's own input size)."""
        model = self.model
        if model.rope is None:
            return None
        if getattr(model, "rope_is_mixed", False):
            raise BackboneError(f"{type(model).__name__} with mixed (per-block) rotary positions is not supported")
        height, width = self._img_size() if image_size is None else image_size
        patch = model.embeds.patch_size
        return model.rope.get_embed(shape=(height // patch[0], width // patch[1]))

    def block_arguments(self, image_size: tuple[int, int] | None = None) -> Callable[[int], dict[str, Any]]:
        rope = self._rope(image_size)
        return lambda index: {} if rope is None else {"rope": rope}

    # ------------------------------------------------------------------ attention and MLP

    def _attention_module(self, block: int) -> nn.Module:
        attn = unwrap_base_layers(self.model.blocks[block].attn)
        if getattr(attn, "qkv", None) is None:
            raise BackboneError(
                f"{type(self.model).__name__} computes q, k and v with three projections, not one fused qkv"
            )
        return attn

    def attention(self, block: int) -> AttentionParts:
        if self.model.rope is not None:
            raise BackboneError(
                f"{type(self.model).__name__} rotates queries and keys by position inside its attention; "
                "it has no plain attention parts"
            )
        return naflex_attention_parts(self._attention_module(block), {})

    def attention_parts_from_call(self, block: int) -> PartsFromCall:
        naflex_attention_parts(self._attention_module(block), {})  # refuses what it cannot read
        return naflex_attention_parts

    def qkv_slot(self, block: int, injections: Any = None) -> tuple[nn.Module, str]:
        attn = self._attention_module(block)
        switch_to_module_call(attn, injections, type(self.model).__name__)  # EVA blocks' q/v biases
        return attn, "qkv"

    # ------------------------------------------------------------------ prefix, tuning, inserted tokens

    def tuned_with_last_blocks(self) -> list[nn.Module]:
        return [self.model.norm, self.model.fc_norm]

    def prefix_state_names(self, cut: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        stem = ("embeds.", "norm_pre.", "rope.")
        return stem, tuple(f"blocks.{i}." for i in range(cut))

    def prefix_modules(self, cut: int) -> list[nn.Module]:
        model = self.model
        return [model.embeds, model.norm_pre, model.rope, *model.blocks[:cut]]

    def prepare_inserted_tokens(self, injections: Any) -> None:
        for block in self.model.blocks:
            rotate_patches_only(unwrap_base_layers(block.attn), injections)
