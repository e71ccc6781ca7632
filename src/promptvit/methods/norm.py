"""Norm tuning: the affine parameters of every normalisation layer (LayerNorm, BatchNorm, GroupNorm, RMSNorm...)
are tuned."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

from torch import nn

from promptvit.backbones import NORM_LAYERS, Geometry, classifier_name
from promptvit.methods.base import Method, MethodConfig, register_method


@dataclasses.dataclass
class NormConfig(MethodConfig):
    """No options. BatchNorm running statistics stay frozen (the backbone runs in eval mode)."""


@register_method
class Norm(Method):
    name = "norm"
    table_rank = 6
    config_class = NormConfig
    paper = "LayerNorm/BatchNorm affine tuning (Basu et al. 2023; related to AP, Zhang et al.)"
    supported_kinds = ("vit", "cnn")
    identity_at_init = True
    counts_standard_blocks = True

    def backbone_parameters_to_tune(self, backbone: nn.Module) -> Iterator[nn.Parameter]:
        head = classifier_name(backbone)
        norms = (
            m
            for n, m in backbone.named_modules()
            if isinstance(m, NORM_LAYERS) and not (n == head or n.startswith(head + "."))
        )
        return itertools.chain.from_iterable(m.parameters(recurse=False) for m in norms)

    def tuned_from_block(self) -> int:
        """No frozen prefix worth caching: norms from block 0 on are tuned."""
        return 0

    @classmethod
    def expected_num_parameters(cls, config: NormConfig, geometry: Geometry) -> int | None:
        if geometry.kind != "vit":
            return None
        return geometry.depth * 4 * geometry.embed_dim + 2 * geometry.embed_dim
