"""Linear probing: only the classifier head is tuned."""

from __future__ import annotations

import dataclasses

from torch import nn

from promptvit.backbones import Geometry
from promptvit.methods.base import BatchedChange, Method, MethodConfig, register_method


@dataclasses.dataclass
class LinearConfig(MethodConfig):
    """No options: the frozen backbone's features feed a new linear head."""


@register_method
class Linear(Method):
    name = "linear"
    table_rank = 0
    is_baseline = True
    config_class = LinearConfig
    paper = "linear probing (baseline in VPT, Jia et al. 2022)"
    supported_kinds = ("vit", "cnn")
    identity_at_init = True

    def tuned_from_block(self) -> int:
        """Only the head is tuned: the pre-logit features are frozen (ViT and CNN)."""
        return self.geometry.depth

    def batched_changes(self, backbone: nn.Module) -> list[BatchedChange]:
        return []

    @classmethod
    def expected_num_parameters(cls, config: LinearConfig, geometry: Geometry) -> int:
        return 0
