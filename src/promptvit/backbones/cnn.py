"""Adapters for timm CNNs: ResNet-style (``layer1..layer4``) and EfficientNet-style (``blocks``) models.

Methods see a CNN as its stages (the activation at a stage's input can be prompted, the last stages can be
tuned) plus the layers between the last stage and the pooling that belong with it.
"""

from __future__ import annotations

from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import ResNet
from torch import nn

from promptvit.backbones.base import BackboneAdapter, register_adapter, unwrap_base_layers
from promptvit.backbones.geometry import Geometry


def classifier_input_width(module: nn.Module) -> int | None:
    """Features a linear or 1x1-convolution classifier reads, or None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
        return module.in_channels
    return None


class CNNAdapter(BackboneAdapter):
    kind = "cnn"

    def geometry(self) -> Geometry:
        model = self.model
        return Geometry(
            kind="cnn",
            architecture=type(model).__name__,
            embed_dim=self.pre_logits_width(),
            depth=len(self.stages),
            img_size=self.input_size(),
            patch_size=(1, 1),
            global_pool=str(getattr(model, "global_pool", "")),
        )

    def pre_logits_width(self) -> int:
        """Width of the pre-logit features: what the classifier reads (a MobileNetV3's ``conv_head`` widens
        the ``num_features`` of its last stage)."""
        width = classifier_input_width(unwrap_base_layers(self.get_classifier()))
        if width is None:
            width = getattr(self.model, "head_hidden_size", None) or self.model.num_features
        return int(width)

    def input_size(self) -> tuple[int, int]:
        """(H, W) of the model's pretrained config (the size a CNN was trained at; any size runs)."""
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return tuple(cfg.get("input_size", (3, 224, 224))[1:])


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
