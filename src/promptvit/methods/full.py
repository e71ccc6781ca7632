"""Full fine-tuning: every backbone parameter is tuned."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from torch import nn

from promptvit.backbones import Geometry
from promptvit.methods.base import Method, MethodConfig, register_method


@dataclasses.dataclass
class FullConfig(MethodConfig):
    """No options."""


@register_method
class Full(Method):
    name = "full"
    table_rank = 1
    config_class = FullConfig
    paper = "full fine-tuning (baseline in VPT, Jia et al. 2022)"
    supported_kinds = ("vit", "cnn")
    identity_at_init = True
    counts_standard_blocks = True
    trains_backbone = True

    def backbone_parameters_to_tune(self, backbone: nn.Module) -> Iterator[nn.Parameter]:
        return backbone.parameters()

    def tuned_from_block(self) -> int:
        """No frozen prefix worth caching: every parameter is tuned."""
        return 0

    @classmethod
    def expected_num_parameters(cls, config: FullConfig, geometry: Geometry) -> int | None:
        if geometry.kind != "vit":
            return None
        d = geometry.embed_dim
        patch_embed = 3 * geometry.patch_size[0] * geometry.patch_size[1] * d + d
        tokens = (geometry.num_prefix_tokens + geometry.pos_embed_len) * d
        return patch_embed + tokens + geometry.depth * geometry.vit_block_parameters() + 2 * d
