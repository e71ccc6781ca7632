"""BitFit: every bias term of the backbone is tuned."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from torch import nn

from promptvit.backbones import Geometry, classifier_name
from promptvit.methods.base import Method, MethodConfig, register_method


@dataclasses.dataclass
class BiasConfig(MethodConfig):
    """No options: linear, convolution and normalisation biases are all tuned."""


@register_method
class Bias(Method):
    name = "bias"
    table_rank = 5
    config_class = BiasConfig
    paper = "BitFit (Ben Zaken et al. 2022; baseline in VPT and EPT)"
    supported_kinds = ("vit", "cnn")
    identity_at_init = True
    counts_standard_blocks = True

    def backbone_parameters_to_tune(self, backbone: nn.Module) -> Iterator[nn.Parameter]:
        head = classifier_name(backbone) + "."
        return (p for n, p in backbone.named_parameters() if n.endswith("bias") and not n.startswith(head))

    def tuned_from_block(self) -> int:
        """No frozen prefix worth caching: biases from the patch embedding on are tuned."""
        return 0

    @classmethod
    def expected_num_parameters(cls, config: BiasConfig, geometry: Geometry) -> int | None:
        if geometry.kind != "vit":
            return None
        d = geometry.embed_dim
        per_block = 2 * d + (3 * d if geometry.qkv_bias else 0) + d + geometry.mlp_hidden + d
        return d + geometry.depth * per_block + d  # patch embedding, blocks, final norm
