"""Adapter for timm ``ConvNeXt``, seen as stages of feature maps (Swin has its own module, ``swin``)."""

from __future__ import annotations

from timm.models.convnext import ConvNeXt
from torch import nn

from promptvit.backbones.base import register_adapter
from promptvit.backbones.cnn import CNNAdapter


@register_adapter(ConvNeXt)
class ConvNeXtAdapter(CNNAdapter):
    """ConvNeXt: ``stem``, ``stages[i]``, ``norm_pre``; the head's norm belongs with the last stage."""

    family = "ConvNeXt"
    tiny_builds = {"convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), 32)}

    def input_module(self) -> nn.Module:
        return self.model.stem

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.model.stages)

    def after_stages(self) -> list[nn.Module]:
        head_norm = getattr(self.model.head, "norm", None)
        return [m for m in (self.model.norm_pre, head_norm) if isinstance(m, nn.Module)]
