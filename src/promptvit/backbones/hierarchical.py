"""Adapters for timm models seen as stages of feature maps: ``ConvNeXt`` and ``SwinTransformer``.

Swin's stages hold window-attention blocks on (B, H, W, C) maps; promptvit treats Swin like a CNN (its
stages, the norm after them, the pixel input) because its windows partition the map: a token prompt has no
window to live in without the VPT paper's per-window variant, which promptvit does not implement. Its
blocks are still transformer blocks, so the adapter also lists them with their fused ``qkv`` projections
and MLPs: methods that change only those modules (LoRA, adapters) run on Swin as on a ViT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models.convnext import ConvNeXt
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from promptvit.backbones.base import mlp_ratio, register_adapter, size_option, unwrap_base_layers
from promptvit.backbones.cnn import CNNAdapter
from promptvit.backbones.geometry import Geometry


@register_adapter(ConvNeXt)
class ConvNeXtAdapter(CNNAdapter):
    """ConvNeXt: ``stem``, ``stages[i]``, ``norm_pre``; the head's norm belongs with the last stage."""

    family = "ConvNeXt"
    tiny_builds = {"convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), 32)}

    def observed_options(self) -> dict[str, Any]:
        stages = self.stages
        return {
            **super().observed_options(),
            "depths": [len(stage.blocks) for stage in stages],
            "dims": [int(info["num_chs"]) for info in self.model.feature_info[: len(stages)]],
        }

    def input_module(self) -> nn.Module:
        return self.model.stem

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.model.stages)

    def after_stages(self) -> list[nn.Module]:
        head_norm = getattr(self.model.head, "norm", None)
        return [m for m in (self.model.norm_pre, head_norm) if isinstance(m, nn.Module)]


@register_adapter(SwinTransformer)
class SwinAdapter(CNNAdapter):
    """Swin: ``patch_embed``, stages ``layers[i]`` (patch merging, then window-attention blocks), ``norm``."""

    family = "SwinTransformer"
    kind_note = (
        "Swin attends within windows of the feature map, so there is no token sequence for prompt tokens or "
        "EPT's per-token prompt rows; the VPT paper's per-window Swin variant is not implemented"
    )
    tiny_builds = {
        "swin": (
            "swin_tiny_patch4_window7_224",
            dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 1), num_heads=(1, 2)),
            32,
        ),
    }

    def geometry(self) -> Geometry:
        model = self.model
        return Geometry(
            kind="cnn",
            architecture=type(model).__name__,
            embed_dim=model.num_features,
            depth=len(self.stages),
            img_size=tuple(model.patch_embed.img_size),
            patch_size=(1, 1),
            global_pool=str(model.global_pool),
        )

    derived_options = ("mlp_ratio",)

    def observed_options(self) -> dict[str, Any]:
        first = [unwrap_base_layers(stage.blocks[0]) for stage in self.stages]
        embed_dim = int(self.model.patch_embed.proj.out_channels)
        hidden = unwrap_base_layers(first[0].mlp).fc1.out_features
        return {
            **super().observed_options(),
            "img_size": size_option(tuple(self.model.patch_embed.img_size)),
            "patch_size": size_option(tuple(self.model.patch_embed.patch_size)),
            "window_size": size_option(tuple(first[0].window_size)),
            "embed_dim": embed_dim,
            "depths": [len(stage.blocks) for stage in self.stages],
            "num_heads": [int(unwrap_base_layers(block.attn).num_heads) for block in first],
            "mlp_ratio": mlp_ratio(hidden, embed_dim),
            "global_pool": str(self.model.global_pool),
        }

    def input_module(self) -> nn.Module:
        return self.model.patch_embed

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.model.layers)

    def after_stages(self) -> list[nn.Module]:
        return [self.model.norm]

    has_transformer_blocks = True

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """Every window-attention block, stage by stage (their widths grow from stage to stage)."""
        return [block for stage in self.model.layers for block in stage.blocks]

    def block_width(self, block: int) -> int:
        return self.blocks[block].dim

    def qkv_slot(self, block: int, injections: Any = None) -> tuple[nn.Module, str]:
        # timm's WindowAttention calls ``self.qkv(x)`` as a module: a wrapped projection takes part as is.
        return unwrap_base_layers(self.blocks[block].attn), "qkv"

    def mlp_slot(self, block: int) -> tuple[nn.Module, str]:
        return self.blocks[block], "mlp"
