"""Adapters for timm CNNs: ResNet-style (``layer1..layer4``) and EfficientNet-style (``blocks``) models.

Methods see a CNN as its stages (the activation at a stage's input can be prompted, the last stages can be
tuned) plus the layers between the last stage and the pooling that belong with it.
"""

from __future__ import annotations

from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import ResNet
from torch import nn

from promptvit.backbones.base import BackboneAdapter, register_adapter
from promptvit.backbones.geometry import Geometry


class CNNAdapter(BackboneAdapter):
    kind = "cnn"

    def geometry(self) -> Geometry:
        model = self.model
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
        return Geometry(
            kind="cnn",
            architecture=type(model).__name__,
            embed_dim=model.num_features,
            depth=len(self.stages),
            img_size=tuple(input_size[1:]),
            patch_size=(1, 1),
            global_pool=str(getattr(model, "global_pool", "")),
        )


@register_adapter(ResNet)
class ResNetAdapter(CNNAdapter):
    """ResNet-style: stem (``conv1``/``bn1``), stages ``layer1..layer4``."""

    family = "ResNet"
    tiny_builds = {"resnet": ("resnet10t", {}, 32)}

    def input_module(self) -> nn.Module:
        return self.model.conv1

    @property
    def stages(self) -> list[nn.Module]:
        return [getattr(self.model, f"layer{i}") for i in range(1, 5)]


@register_adapter(EfficientNet, MobileNetV3)
class EfficientNetAdapter(CNNAdapter):
    """EfficientNet-style: stem (``conv_stem``/``bn1``), stages ``blocks[i]``, then ``conv_head``/``bn2``."""

    family = "EfficientNet"
    tiny_builds = {
        "tinynet": ("tinynet_e", {}, 32),
    }

    def input_module(self) -> nn.Module:
        return self.model.conv_stem

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def after_stages(self) -> list[nn.Module]:
        return [getattr(self.model, name) for name in ("conv_head", "bn2") if hasattr(self.model, name)]
