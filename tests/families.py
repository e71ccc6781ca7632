"""Tiny random-init builds of every registered backbone family, plus medical-backbone shapes.

``FAMILY_BUILDS`` is collected from the adapters' ``tiny_builds``, so a new family (one adapter module with
its builds) joins every test that loops over it. ``MEDICAL_BUILDS`` keeps the architecture options of the
pathology and ophthalmology backbones people wrap, at tiny widths and depths.
name -> (timm architecture, build options, input size)
"""

from __future__ import annotations

import timm
import torch
from timm.layers import SwiGLUPacked

from promptvit.backbones import create_backbone, registered_adapters

FAMILY_BUILDS: dict[str, tuple[str, dict, int]] = {
    name: build
    for adapter in dict.fromkeys(registered_adapters().values())
    for name, build in adapter.tiny_builds.items()
    if timm.is_model(build[0])  # older timm releases lack some (DINOv3, RoPE ViTs)
}

_VIT = dict(embed_dim=32, depth=2, num_heads=2)

_MEDICAL: dict[str, tuple[str, dict, int]] = {
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
    # DINOv3: timm Eva with rotary positions, 4 registers, LayerScale, dynamic image size, average pooling
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=16, patch_size=4, **_VIT), 16),
}

MEDICAL_BUILDS = {name: spec for name, spec in _MEDICAL.items() if timm.is_model(spec[0])}


def present(*names: str) -> list[str]:
    """The names among ``names`` whose tiny build this timm version can make."""
    return [name for name in names if name in FAMILY_BUILDS]


def build(table: dict[str, tuple[str, dict, int]], name: str, num_classes: int = 3, seed: int = 0):
    """A tiny random-init backbone from ``table``; the same seed gives the same weights."""
    arch, options, _ = table[name]
    return create_backbone(arch, num_classes=num_classes, init_seed=seed, **options).eval()


def make_blocks_visible(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) values for the scales that start (near) zero and hide what a block's attention and MLP do.

    LayerScale starts at 1e-5 (DINOv2/v3, UNI, Virchow2, RoPE ViT) and SwinV2's residual post-norms at 0
    (every block is then the identity); random-init tests that follow a block's maths need them visible.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, p in model.named_parameters():
            post_norm = parameter_name.endswith(("norm1.weight", "norm2.weight")) and not p.any()
            if post_norm or parameter_name.rpartition(".")[2] in ("gamma", "gamma_1", "gamma_2"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    return model


def family_input(table: dict[str, tuple[str, dict, int]], name: str, batch: int = 2, seed: int = 1):
    size = table[name][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
