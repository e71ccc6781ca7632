"""Adapter for timm ``NaFlexVit`` (SigLIP 2 NaFlex and timm's NaFlex ViTs; timm >= 1.0.16).

NaFlexVit is a ViT whose embedding module (``embeds``) patchifies images of any size or takes pre-patchified
batches (``{"patches", "patch_coord", "patch_valid"}``), so each sample's patch tokens carry their own
positions (learned or factorised position embeddings resampled to its grid, or rotary positions) and their
own validity: padded patches are masked out of the attention by an additive ``attn_mask`` the model hands to
every block, and out of the pooling.

Prompt tokens are prefix tokens: they go after the class and register tokens, get no position (no position
embedding, no rotation) and are valid for every sample. While a token-prompt method is attached, a pre-hook on
each block pads the block's ``attn_mask`` with zero (visible) rows and columns for them, and on rotary blocks
the rotation is restricted to the patch tokens as on Eva; both are entries of the method's ledger. The model's
pooling then sees its own tokens again (prompts are stripped before the final norm) with their own validity.
Methods that learn one tensor row per token (EPT, VP's token mode, AP) need a fixed token count: they are
sized for the input size of the model's pretrained config and run on images of that size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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
from promptvit.backbones.beit import pad_bias
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


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as timm's NaFlexVit builds it: additive, 0 where a key is seen, the lowest value of
    ``dtype`` where not (a boolean mask is True where a key is seen)."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def masked_attention_parts(attn: nn.Module, call: dict[str, Any]) -> AttentionParts:
    """The parts of a NaFlexVit block's attention for one call; its mask becomes the additive logit bias.

    timm's plain ``Attention``, or on blocks with rotary positions the EVA attention, rotated by the call's
    ``rope`` (prefix tokens unrotated).
    """
    mask = call.get("attn_mask")
    rest = {k: v for k, v in call.items() if k != "attn_mask"}
    if hasattr(attn, "num_prefix_tokens"):  # timm's EvaAttention: rotary positions, maybe q/v biases
        parts = rotary_attention_parts(attn, rest)
    else:
        parts = timm_attention_parts(attn)
    if mask is None:
        return parts
    return dataclasses.replace(parts, logit_bias=additive_mask(mask, unwrap_base_layers(attn.qkv).weight.dtype))


class VisibleInsertedTokens:
    """A pre-hook (with keyword arguments) on a block: its ``attn_mask``, built by the model for its own tokens,
    gets rows and columns for the tokens inserted at ``position``, which see and are seen by every token."""

    def __init__(self, position: int) -> None:
        self.position = position

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
        mask = kwargs.get("attn_mask")
        inserted = 0 if mask is None else args[0].shape[1] - mask.shape[-1]
        if inserted <= 0:
            return args, kwargs
        mask = additive_mask(mask, args[0].dtype)
        if mask.shape[-2] == 1:  # a key-only mask (B, 1, 1, N): the columns only
            zeros = mask.new_zeros(*mask.shape[:-1], inserted)
            mask = torch.cat([mask[..., : self.position], zeros, mask[..., self.position :]], dim=-1)
        else:
            mask = pad_bias(mask, self.position, inserted)
        return args, {**kwargs, "attn_mask": mask}


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
            dynamic_img_size=True,  # any image size, and pre-patchified NaFlex batches
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

    def _rope(self) -> torch.Tensor | None:
        """The rotary table of the model's own image size (cached block inputs come from such images)."""
        model = self.model
        if model.rope is None:
            return None
        if getattr(model, "rope_is_mixed", False):
            raise BackboneError(f"{type(model).__name__} with mixed (per-block) rotary positions is not supported")
        height, width = self._img_size()
        patch = model.embeds.patch_size
        return model.rope.get_embed(shape=(height // patch[0], width // patch[1]))

    def forward_blocks(self, tokens: torch.Tensor, blocks: Sequence[nn.Module]) -> torch.Tensor:
        call: dict[str, Any] = {"attn_mask": None}
        rope = self._rope()
        if rope is not None:
            call["rope"] = rope
        for block in blocks:
            tokens = block(tokens, **call)
        return tokens

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
        return masked_attention_parts(self._attention_module(block), {})

    def attention_parts_from_call(self, block: int) -> PartsFromCall:
        masked_attention_parts(self._attention_module(block), {})  # refuses what it cannot read
        return masked_attention_parts

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
        visible = VisibleInsertedTokens(self.prompt_position)
        for block in self.model.blocks:
            injections.pre_hook(block, visible, with_kwargs=True)
            rotate_patches_only(unwrap_base_layers(block.attn), injections)
