"""MLP-k: a k-layer MLP head on the frozen features."""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from torch import nn

from promptvit.backbones import Geometry, classifier_name
from promptvit.layers.token_prompts import reference_device_dtype
from promptvit.methods.base import ConfigError, Method, register_method
from promptvit.methods.linear import HeadSolverConfig, SolvedHead


@dataclasses.dataclass
class MLPConfig(HeadSolverConfig):
    num_layers: int = 3  # k: k-1 hidden layers of the feature width, then the linear classifier
    activation: Literal["relu", "gelu"] = "relu"

    method_label = "mlp"

    def validate(self) -> None:
        super().validate()
        if self.num_layers < 2:
            raise ConfigError(
                f"mlp: num_layers must be >= 2 (1 is the 'linear' method), got {self.num_layers}"
            )


@register_method
class MLP(SolvedHead, Method):
    name = "mlp"
    table_rank = 3
    config_class = MLPConfig
    paper = "MLP-k head (baseline in VPT, Jia et al. 2022)"
    supported_kinds = ("vit", "cnn")

    def attach(self, backbone: nn.Module) -> None:
        self.check_solver(backbone)

    def build_head(self, classifier: nn.Module) -> nn.Module:
        """``num_layers - 1`` hidden layers of the feature width, then the classifier."""
        width = self.geometry.embed_dim
        act = {"relu": nn.ReLU, "gelu": nn.GELU}[self.config.activation]
        # a 1x1-convolution classifier (DLA, DPN, BiT) reads (B, C, 1, 1) maps: its hidden layers do too
        device, dtype = reference_device_dtype(classifier)
        factory = {"device": device, "dtype": dtype}
        layer = functools.partial(nn.Conv2d, kernel_size=1) if isinstance(classifier, nn.Conv2d) else nn.Linear
        hidden = [
            module for _ in range(self.config.num_layers - 1) for module in (layer(width, width, **factory), act())
        ]
        return nn.Sequential(*hidden, classifier)

    def classifier_of(self, head: nn.Module) -> nn.Module:
        return head[-1]

    def replace_classifier(self, head: nn.Module, classifier: nn.Module) -> nn.Module:
        head[-1] = classifier  # the hidden layers stay
        return head

    def head_name(self, backbone: nn.Module) -> str:
        return f"{classifier_name(backbone)}.{2 * (self.config.num_layers - 1)}"

    def modules_in_train_mode(self, backbone: nn.Module) -> list[nn.Module]:
        return []  # the head is put in train mode by the model

    def tuned_from_block(self) -> int:
        """Only the MLP head is tuned: the pre-logit features are frozen (ViT and CNN)."""
        return self.geometry.depth

    @classmethod
    def expected_num_parameters(cls, config: MLPConfig, geometry: Geometry) -> int:
        d = geometry.embed_dim
        return (config.num_layers - 1) * (d * d + d)
