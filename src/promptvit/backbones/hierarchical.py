"""Adapter for timm ``ConvNeXt``, seen as stages of feature maps (Swin has its own module, ``swin``)."""

from __future__ import annotations

from typing import Any

from timm.models.convnext import ConvNeXt
from torch import nn

from promptvit.backbones.base import register_adapter
from promptvit.backbones.cnn import CNNAdapter


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
