"""Adapter for timm ``Eva``: EVA-02, DINOv3 and the RoPE ViTs (rotary position embeddings).

Inserted tokens (prompts) go after the prefix tokens and get **no** rotary position: EVA's attention
rotates every token after its first ``num_prefix_tokens``, so while a token-prompt method is attached a
pre-hook on each attention sets that count to "all tokens but the last ``len(rope)``" (the patch tokens),
which leaves each patch token exactly the rotation it has without prompts, and a hook puts the count back
after the call. ``_pos_embed`` (timm private; it returns the tokens and the rotary table)
is read here only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva
from torch import nn

from promptvit.backbones.base import (
    AttentionParts,
    BackboneError,
    PartsFromCall,
    TimmTokenAdapter,
    register_adapter,
    unwrap_base_layers,
)
from promptvit.backbones.geometry import Geometry
from promptvit.backbones.vit import mlp_hidden_width, timm_attention_parts


def _rotary_positions_for_patches(attn: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    rope = kwargs.get("rope")
    if rope is not None:
        attn.num_prefix_tokens = args[0].shape[1] - rope.shape[-2]


def _restore_prefix_count(count: int, attn: nn.Module, args: tuple, output: torch.Tensor) -> None:
    attn.num_prefix_tokens = count


def rotate_patches_only(attn: nn.Module, injections: Any) -> None:
    """Record in ``injections`` the hooks that let an EVA/RoPE attention rotate only its patch tokens.

    It rotates every token after its first ``num_prefix_tokens``; with inserted tokens the count becomes "all
    but the last ``len(rope)``" for the call, and comes back after it.
    """
    if hasattr(attn, "num_prefix_tokens"):
        # keyed: every token-prompt adapter needs them once
        injections.pre_hook(attn, _rotary_positions_for_patches, with_kwargs=True, key="inserted tokens")
        injections.hook(attn, functools.partial(_restore_prefix_count, attn.num_prefix_tokens), key="inserted tokens")


def switch_to_module_call(attn: nn.Module, injections: Any, model_name: str) -> None:
    """Make an EVA/BEiT attention call ``attn.qkv`` as a module: its q/v biases then go in as a separate sum.

    With biases, timm computes ``F.linear(x, attn.qkv.weight, [q_bias | 0 | v_bias])``, which bypasses any
    module put in place of ``qkv``. ``qkv_bias_separate`` (timm's own switch) gives ``qkv(x) + bias``: the
    same sum, rounded once more. Recorded in the method's ledger, so the disabled model is timm's again.
    """
    if getattr(attn, "q_bias", None) is None or getattr(attn, "qkv_bias_separate", False):
        return
    if injections is None or not hasattr(attn, "qkv_bias_separate"):  # the switch came with timm 1.0.x
        raise BackboneError(
            f"{model_name} adds its q/v biases inside F.linear on attn.qkv.weight, so a wrapped or hooked qkv "
            "module would be bypassed"
        )
    injections.replace(attn, "qkv_bias_separate", True, key="module call")  # shared by the adapters needing it


def separate_qkv_bias(attn: nn.Module) -> torch.Tensor | None:
    """``[q_bias | k_bias | v_bias]`` of an EVA/BEiT attention (added outside its bias-free qkv), or None."""
    if getattr(attn, "q_bias", None) is None:
        return None
    return torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))


def rotary_attention_parts(attn: nn.Module, call: dict[str, Any]) -> AttentionParts:
    """The parts of an ``EvaAttention``/``AttentionRope`` for one call, ``rope`` (the rotary table) included.

    As timm: q/v biases added to the fused projection, then q/k norms, then every token after the first
    ``num_prefix_tokens`` rotated by ``rope`` (the prefix tokens are not).
    """
    if getattr(attn, "qkv", None) is None:
        raise BackboneError(f"{type(attn).__name__} computes q, k and v with three projections, not one fused qkv")
    if getattr(attn, "num_kv_groups", 1) != 1:
        raise BackboneError(f"{type(attn).__name__} shares keys and values over query heads (grouped-query)")
    if call.get("attn_mask") is not None or call.get("is_causal"):
        raise BackboneError(f"{type(attn).__name__} was called with an attention mask; none is expected")
    parts = dataclasses.replace(timm_attention_parts(attn), qkv_bias=separate_qkv_bias(attn))
    rope = call.get("rope")
    if rope is None:
        return parts
    prefix, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        # `half` exists only in newer timm; older ones rotate interleaved pairs, which is half=False
        rotated = apply_rot_embed_cat(t[:, :, prefix:], rope, **({"half": True} if half else {}))
        return torch.cat([t[:, :, :prefix], rotated], dim=2)

    return dataclasses.replace(parts, rotate=rotate)


@register_adapter(Eva)
class EvaAdapter(TimmTokenAdapter):
    family = "Eva"
    tiny_builds = {
        # EVA-02: absolute + rotary positions, SwiGLU, q/v biases
        "eva02": (
            "eva02_tiny_patch14_224",
            dict(img_size=16, patch_size=4, ref_feat_shape=(4, 4), embed_dim=32, depth=2, num_heads=2),
            16,
        ),
        # RoPE ViT (timm ``AttentionRope``), class-token readout
        "vit_rope": (
            "vit_small_patch16_rope_224",
            dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
            16,
        ),
        # DINOv3: rotary positions, 4 registers, LayerScale, dynamic image size
        "dinov3": (
            "vit_small_patch16_dinov3",
            dict(img_size=16, patch_size=4, global_pool="token", embed_dim=32, depth=2, num_heads=2),
            16,
        ),
    }

    model: Eva

    def geometry(self) -> Geometry:
        model = self.model
        attn = unwrap_base_layers(model.blocks[0].attn)
        qkv = getattr(attn, "qkv", None)
        has_bias = getattr(attn, "q_bias", None) is not None or (
            qkv is not None and unwrap_base_layers(qkv).bias is not None
        )
        return self.token_geometry(
            num_heads=int(attn.num_heads),
            mlp_hidden=mlp_hidden_width(model.blocks[0].mlp),
            qkv_bias=has_bias,
        )

    def observed_options(self) -> dict[str, Any]:
        model = self.model
        reference = getattr(getattr(model, "rope", None), "ref_feat_shape", None)
        return {
            **super().observed_options(),
            "class_token": model.cls_token is not None,
            "num_reg_tokens": model.reg_token.shape[1] if getattr(model, "reg_token", None) is not None else 0,
            "ref_feat_shape": list(reference) if reference is not None else None,
        }

    def _tokens_and_rope(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        model = self.model
        x, rope = model._pos_embed(model.patch_embed(images))
        norm_pre = getattr(model, "norm_pre", None)  # timm < 1.0.10 has none
        return (norm_pre(x) if norm_pre is not None else x), rope

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self._tokens_and_rope(images)[0]

    def _rope(self, image_size: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The rotary table for images of ``image_size`` (the blocks need it besides the tokens), as timm's
        ``_pos_embed`` makes it; by default for the model's own input size.

        With ``dynamic_img_size`` cached block inputs must come from images of that size (a token count that
        does not match the table fails in timm's rotation, it is never silently misplaced).
        """
        model = self.model
        if model.rope is None:
            return None
        if model.dynamic_img_size and image_size is not None:
            return model.rope.get_embed(shape=model.patch_embed.dynamic_feat_size(tuple(image_size)))
        if hasattr(model.rope, "feat_shape") and not model.dynamic_img_size:
            return model.rope.get_embed()
        return model.rope.get_embed(shape=model.patch_embed.grid_size)

    def block_arguments(self, image_size: tuple[int, int] | None = None) -> Callable[[int], dict[str, Any]]:
        rope = self._rope(image_size)
        if rope is not None and getattr(self.model, "rope_mixed", False):  # one table per block
            return lambda index: {"rope": rope[index]}
        return lambda index: {"rope": rope}

    def attention(self, block: int) -> AttentionParts:
        attn = unwrap_base_layers(self.model.blocks[block].attn)
        if self.model.rope is not None:
            raise BackboneError(
                f"{type(self.model).__name__} rotates queries and keys by position inside its "
                "attention; it has no plain attention parts"
            )
        self._check_fused_qkv(attn)
        return timm_attention_parts(attn)

    def attention_parts_from_call(self, block: int) -> PartsFromCall:
        rotary_attention_parts(unwrap_base_layers(self.model.blocks[block].attn), {})  # refuses unfused qkv
        return rotary_attention_parts

    def qkv_slot(self, block: int, injections: Any = None) -> tuple[nn.Module, str]:
        attn = unwrap_base_layers(self.model.blocks[block].attn)
        if getattr(attn, "qkv", None) is None:
            raise BackboneError(
                f"{type(self.model).__name__} computes q, k and v with three projections, not one fused qkv"
            )
        switch_to_module_call(attn, injections, type(self.model).__name__)
        return attn, "qkv"

    def _check_fused_qkv(self, attn: nn.Module) -> None:
        if getattr(attn, "qkv", None) is None or (
            getattr(attn, "q_bias", None) is not None and not getattr(attn, "qkv_bias_separate", False)
        ):
            raise BackboneError(
                f"{type(self.model).__name__} computes q, k, v with separate projections or biases outside "
                "its qkv module; it has no plain attention parts"
            )

    def tuned_with_last_blocks(self) -> list[nn.Module]:
        return [self.model.norm, self.model.fc_norm]

    def prefix_state_names(self, cut: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        stem = ("patch_embed.", "norm_pre.", "cls_token", "reg_token", "pos_embed", "rope.")
        return stem, tuple(f"blocks.{i}." for i in range(cut))

    def prefix_modules(self, cut: int) -> list[nn.Module]:
        model = self.model
        stem = [getattr(model, name, None) for name in ("patch_embed", "norm_pre", "patch_drop", "rope")]
        return [*stem, *model.blocks[:cut]]

    def prepare_inserted_tokens(self, injections: Any) -> None:
        for block in self.model.blocks:
            rotate_patches_only(unwrap_base_layers(block.attn), injections)
