"""Adapter for timm ``VisionTransformer`` (class token or not, register tokens, any global pool).

The only module that reads ViT internals: the embedding steps before block 0 (``patch_embed``,
``_pos_embed``, ``patch_drop``, ``norm_pre``; timm has no public call for "tokens at the input of block 0"),
the layout of timm's pre-norm ``Block`` (for computing selected output rows) and of its ``Attention``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import Attention, Block, LayerScale, VisionTransformer
from torch import nn

from promptvit.backbones.base import (
    AttentionParts,
    BackboneError,
    PartsFromCall,
    Select,
    TimmTokenAdapter,
    attend,
    register_adapter,
    unwrap_base_layers,
)
from promptvit.backbones.geometry import Geometry


def timm_attention_parts(attn: nn.Module) -> AttentionParts:
    """The parts of a timm fused-qkv ``Attention``.

    ``gate``, ``norm`` and the q/k norms are optional across timm 1.0 (EVA's attention in timm 1.0.9 has no
    q/k norms: identity is what it computes).
    """
    required = ("qkv", "num_heads", "scale", "attn_drop", "proj")
    missing = [name for name in required if not hasattr(attn, name)]
    if missing:
        raise BackboneError(f"{type(attn).__name__} is not a timm fused-qkv attention: it lacks {missing}")
    num_heads = int(attn.num_heads)
    if hasattr(attn, "head_dim"):
        head_dim = int(attn.head_dim)
    else:
        head_dim = unwrap_base_layers(attn.qkv).out_features // (3 * num_heads)
    return AttentionParts(
        module=attn,
        qkv=attn.qkv,
        num_heads=num_heads,
        head_dim=head_dim,
        scale=float(attn.scale),
        q_norm=_optional(attn, "q_norm"),
        k_norm=_optional(attn, "k_norm"),
        attn_drop=attn.attn_drop,
        norm=_optional(attn, "norm"),
        gate=getattr(attn, "gate", None),  # timm >= 1.0.28 only
        proj=attn.proj,
        proj_drop=_optional(attn, "proj_drop"),
    )


def mlp_hidden_width(mlp: nn.Module) -> int:
    """Hidden width of any MLP timm builds: what its output projection, its last linear layer, reads.

    ``Mlp`` (``fc1``, ``fc2``), ``GluMlp``/``SwiGLUPacked`` (``fc1`` packs the value and the gate, ``fc2`` reads
    the value), ``SwiGLU`` (``fc1_x``, ``fc1_g``, e.g. AIMv2), ViTamin's ``GeGluMlp`` (``w0``, ``w1``, ``w2``).
    """
    linears = [m for m in unwrap_base_layers(mlp).modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BackboneError(f"{type(mlp).__name__} has no linear layer: it is not an MLP promptvit can read")
    return int(linears[-1].in_features)


def plain_attention_parts(attn: nn.Module, call: dict[str, Any]) -> AttentionParts:
    """timm's plain fused-qkv ``Attention``: its parts do not depend on the call."""
    return timm_attention_parts(attn)


def _optional(module: nn.Module, name: str) -> nn.Module:
    part = getattr(module, name, None)
    return part if part is not None else nn.Identity()


@register_adapter(VisionTransformer)
class ViTAdapter(TimmTokenAdapter):
    family = "VisionTransformer"
    tiny_builds = {
        "vit_token": (
            "vit_tiny_patch16_224",
            dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2),
            16,
        ),
        "vit_avg_no_cls": (
            "vit_tiny_patch16_224",
            dict(
                img_size=16,
                patch_size=4,
                embed_dim=24,
                depth=3,
                num_heads=3,
                class_token=False,
                global_pool="avg",
            ),
            16,
        ),
        # DINOv2 with registers: 4 register tokens, LayerScale
        "vit_reg": (
            "vit_small_patch14_reg4_dinov2",
            dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
            16,
        ),
        # SigLIP: attention-pool (map) readout, no class token
        "vit_map": (
            "vit_base_patch16_siglip_224",
            dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
            16,
        ),
        # AIMv2: timm's SwiGLU MLP (fc1_x and fc1_g), RMSNorm, no class token, average pooling
        "vit_aimv2": (
            "aimv2_large_patch14_224",
            dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
            16,
        ),
        "vit_no_embed_class_qk_norm_avgmax": (
            "vit_tiny_patch16_224",
            dict(
                img_size=16,
                patch_size=4,
                embed_dim=32,
                depth=2,
                num_heads=2,
                no_embed_class=True,
                qk_norm=True,
                global_pool="avgmax",
            ),
            16,
        ),
    }

    model: VisionTransformer

    def geometry(self) -> Geometry:
        model = self.model
        block = model.blocks[0]
        attn = self.attention(0)
        return self.token_geometry(
            num_heads=attn.num_heads,
            mlp_hidden=mlp_hidden_width(block.mlp),
            qkv_bias=unwrap_base_layers(attn.qkv).bias is not None,
        )

    def observed_options(self) -> dict[str, Any]:
        model = self.model
        q_norm = getattr(unwrap_base_layers(model.blocks[0].attn), "q_norm", None)
        return {
            **super().observed_options(),
            "class_token": model.cls_token is not None,
            "reg_tokens": int(model.num_reg_tokens),
            "no_embed_class": bool(model.no_embed_class),
            "qk_norm": q_norm is not None and not isinstance(q_norm, nn.Identity),
            "pre_norm": not isinstance(model.norm_pre, nn.Identity),
            # LayerScale or not (its values come with the weights; a canonical value keeps defaults equal)
            "init_values": 1e-5 if isinstance(getattr(model.blocks[0], "ls1", None), LayerScale) else None,
        }

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)

    def attention(self, block: int) -> AttentionParts:
        return timm_attention_parts(unwrap_base_layers(self.model.blocks[block].attn))

    def attention_parts_from_call(self, block: int) -> PartsFromCall:
        self.attention(block)  # refuses an attention that is not timm's fused-qkv one
        return plain_attention_parts

    def qkv_slot(self, block: int, injections: Any = None) -> tuple[nn.Module, str]:
        return unwrap_base_layers(self.model.blocks[block].attn), "qkv"

    def supports_selected_rows(self, block: int) -> bool:
        return supports_selected_rows(self.model.blocks[block])

    def forward_block_rows(self, block: int, x: torch.Tensor, select: Select) -> torch.Tensor:
        return forward_block_rows(self.model.blocks[block], x, select)

    def reads_class_token_only(self) -> bool:
        model = self.model
        return (
            model.global_pool == "token"
            and getattr(model, "attn_pool", None) is None
            and type(model).forward_head is VisionTransformer.forward_head
            # ``pool`` exists from timm 1.0.1x on; before it, forward_head pooled inline
            and getattr(type(model), "pool", None) is getattr(VisionTransformer, "pool", None)
        )

    def tuned_with_last_blocks(self) -> list[nn.Module]:
        return [self.model.norm, self.model.fc_norm]

    def prefix_state_names(self, cut: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        stem = ("patch_embed.", "norm_pre.", "cls_token", "reg_token", "pos_embed")
        return stem, tuple(f"blocks.{i}." for i in range(cut))

    def prefix_modules(self, cut: int) -> list[nn.Module]:
        model = self.model
        return [model.patch_embed, model.norm_pre, getattr(model, "patch_drop", None), *model.blocks[:cut]]


def supports_selected_rows(block: nn.Module) -> bool:
    """timm's plain pre-norm ``Block`` whose attention is timm's or computes selected rows itself."""
    if type(block) is not Block:
        return False
    attn = block.attn
    return type(attn) is Attention or callable(getattr(attn, "forward_selected", None))


def forward_block_rows(block: nn.Module, x: torch.Tensor, select: Select) -> torch.Tensor:
    """``select(block(x))`` for a timm pre-norm ``Block``, computing only the selected rows.

    Module calls go through ``attn.qkv``, ``attn.proj`` and ``mlp`` (injected layers and hooks on them
    apply), but ``block.attn`` is not called as a module: hooks on it do not fire.
    """
    attn = block.attn
    h = block.norm1(x)
    if type(attn) is Attention:
        out = attend(timm_attention_parts(attn), h, select=select)
    else:
        out = attn.forward_selected(h, select)
    y = select(x) + block.drop_path1(block.ls1(out))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
