"""AdaptFormer (Chen et al., NeurIPS 2022): a scaled bottleneck in parallel with every block's MLP.

Per block: ``x'' = x' + MLP(LN(x')) + s * up(ReLU(down(LN(x'))))``, the paper's formulation (see
:mod:`promptvit.layers.adapter`): the adapter reads the same normalised hidden state as the MLP. The
bottleneck width is ``embed_dim // reduction`` unless ``bottleneck`` is given (AdaptFormer's ViT-B runs
quote 64).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torch import nn

from promptvit.backbones import BackboneAdapter, Geometry, adapter_for
from promptvit.layers.adapter import Bottleneck, ParallelAdapterMlp
from promptvit.methods.base import ConfigError, Method, MethodConfig, register_method
from promptvit.methods.lora import adapted_blocks, check_block_list, resolve_blocks


@dataclasses.dataclass
class AdapterConfig(MethodConfig):
    reduction: int = 8  # bottleneck = embed_dim // reduction
    bottleneck: int | None = None  # explicit bottleneck width; overrides reduction
    scale: float = 0.1  # s, fixed
    dropout: float = 0.0  # after the ReLU, inside the adapter
    layers: list[int] | None = None  # block indices; None: every block

    def validate(self) -> None:
        if self.reduction < 1:
            raise ConfigError(f"adapter: reduction must be >= 1, got {self.reduction}")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ConfigError(f"adapter: bottleneck must be >= 1, got {self.bottleneck}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter: dropout must be in [0, 1), got {self.dropout}")
        self.layers = check_block_list(self.layers, "adapter")

    def bottleneck_width(self, embed_dim: int) -> int:
        return self.bottleneck if self.bottleneck is not None else embed_dim // self.reduction


@register_method
class Adapter(Method):
    name = "adapter"
    table_rank = 7
    config_class = AdapterConfig
    paper = "AdaptFormer (Chen et al., NeurIPS 2022)"
    identity_at_init = True
    test_options = {"reduction": 4}

    @classmethod
    def supports(cls, adapter: BackboneAdapter) -> bool:
        """ViTs, and staged families whose transformer blocks the adapter lists (Swin)."""
        return adapter.kind in cls.supported_kinds or adapter.has_transformer_blocks

    def attach(self, backbone: nn.Module) -> None:
        config: AdapterConfig = self.config
        adapter = adapter_for(backbone)
        for index in adapted_blocks(adapter, config.layers, self.name):
            d = adapter.block_width(index)  # Swin's widths grow from stage to stage
            width = config.bottleneck_width(d)
            if width < 1:
                raise ConfigError(f"adapter: reduction {config.reduction} leaves no bottleneck for width {d}")
            if width > d:  # wider than the block it runs beside: parameters without a bottleneck
                raise ConfigError(
                    f"adapter: bottleneck {width} is wider than block {index} ({d}); choose bottleneck <= {d}"
                )
            parent, name = adapter.mlp_slot(index)
            layer = self.injections.layer(
                parent, name, ParallelAdapterMlp, lambda mlp: ParallelAdapterMlp(mlp, self.routing)
            )
            layer.add_adapter(self.adapter_name, d, width, scale=config.scale, dropout=config.dropout)

    def tuned_from_block(self) -> int:
        """Blocks before the first adapted one are frozen (0 with the default ``layers=None``; 0 on staged
        families, whose only cache cut is after the last stage)."""
        if self.geometry.kind != "vit":
            return 0
        return min(resolve_blocks(self.config.layers, self.geometry.depth, self.name))

    def bottlenecks(self) -> list[Bottleneck]:
        """This adapter's bottleneck beside each adapted MLP, block by block."""
        return [entry.target.adapter[self.adapter_name] for entry in self.injections.entries("replace")]

    def modules_in_train_mode(self, backbone: nn.Module) -> Iterable[nn.Module]:
        # Only the bottlenecks: the wrapped frozen MLP keeps its dropout off like the rest of the backbone.
        return self.bottlenecks()

    @classmethod
    def expected_num_parameters(cls, config: AdapterConfig, geometry: Geometry) -> int | None:
        if geometry.kind != "vit":
            return None
        d = geometry.embed_dim
        b = config.bottleneck_width(d)
        blocks = geometry.depth if config.layers is None else len(config.layers)
        return blocks * (d * b + b + b * d + d)
