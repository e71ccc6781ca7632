"""Tiny random-init builds of every timm family promptvit supports, plus medical-backbone shapes.

Each entry keeps the architecture options that matter (rotary or relative positions, prefix tokens, pooling,
LayerScale, SwiGLU, windows) at a width, depth and image size that build and run in milliseconds.
name -> (timm architecture, build options, input size)
"""

from __future__ import annotations

import torch
from timm.layers import SwiGLUPacked

_VIT = dict(embed_dim=32, depth=2, num_heads=2)

FAMILY_BUILDS: dict[str, tuple[str, dict, int]] = {
    # timm VisionTransformer options
    "vit_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=16, patch_size=4, **_VIT), 16),
    "vit_map": ("vit_base_patch16_siglip_224", dict(img_size=16, patch_size=4, **_VIT), 16),
    "vit_no_embed_class": (
        "vit_tiny_patch16_224",
        dict(img_size=16, patch_size=4, no_embed_class=True, qk_norm=True, global_pool="avgmax", **_VIT),
        16,
    ),
    # timm VisionTransformerDistilled (class and distillation tokens, two heads)
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=16, patch_size=4, **_VIT), 16),
    # timm Eva: EVA-02 (abs + rotary positions, SwiGLU), RoPE ViT, DINOv3 (rotary, 4 registers, LayerScale)
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=16, patch_size=4, ref_feat_shape=(4, 4), **_VIT), 16),
    "vit_rope": ("vit_small_patch16_rope_224", dict(img_size=16, patch_size=4, **_VIT), 16),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=16, patch_size=4, global_pool="token", **_VIT), 16),
    # timm Beit (relative position bias)
    "beit": ("beit_base_patch16_224", dict(img_size=16, patch_size=4, **_VIT), 16),
    # timm SwinTransformer (window attention, patch merging)
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
        32,
    ),
    # timm ConvNeXt
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), 32),
}

# Tiny widths and depths with the architecture options of the medical backbones people wrap.
MEDICAL_BUILDS: dict[str, tuple[str, dict, int]] = {
    # RETFound: ViT-L/16, global average pooling (fc_norm), no class-token readout
    "retfound": ("vit_large_patch16_224", dict(img_size=16, patch_size=4, global_pool="avg", **_VIT), 16),
    # UNI: ViT-L/16, LayerScale, dynamic image size
    "uni": (
        "vit_large_patch16_224",
        dict(img_size=16, patch_size=4, init_values=1e-5, dynamic_img_size=True, **_VIT),
        16,
    ),
    # Virchow2: ViT-H/14, SwiGLU (packed) MLP with SiLU, LayerScale, 4 register tokens
    "virchow2": (
        "vit_huge_patch14_224",
        dict(
            img_size=28,
            patch_size=7,
            init_values=1e-5,
            mlp_ratio=5.3375,
            mlp_layer=SwiGLUPacked,
            act_layer=torch.nn.SiLU,
            reg_tokens=4,
            **_VIT,
        ),
        28,
    ),
    # DINOv2 with registers: LayerScale, 4 register tokens, patch 14
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, patch_size=7, **_VIT), 28),
    # DINOv3: timm Eva with rotary positions, 4 registers, LayerScale, dynamic image size
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=16, patch_size=4, **_VIT), 16),
}

