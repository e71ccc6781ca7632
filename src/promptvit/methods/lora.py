"""LoRA (Hu et al., ICLR 2022) on the query/key/value parts of every block's fused ``qkv`` projection.

timm ViTs compute q, k and v with one ``nn.Linear`` (``attn.qkv``, output ``[q | k | v]``). Each chosen
part gets its own rank-r update ``(alpha / r) * B A`` (see :mod:`promptvit.layers.lora`); by default q and v,
as in the paper. ``merge()`` folds the updates into the frozen ``qkv`` weights for inference.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

from torch import nn

from promptvit.backbones import BackboneAdapter, BackboneError, Geometry, adapter_for, unwrap_base_layers
from promptvit.layers.lora import FusedLoRALinear, LoRAFactors
from promptvit.methods.base import ConfigError, Method, MethodConfig, PeftForm, Rounding, register_method

QKV = ("q", "k", "v")


def check_block_list(layers: Sequence[int] | None, method: str) -> list[int] | None:
    """Validate a ``layers`` option (block indices, or ``None`` for every block) without the geometry.

    Negative indices count from the end, as in Python (``-1`` is the last block), so a value holds at any depth.
    """
    if layers is None:
        return None
    layers = list(layers)
    if not layers:
        raise ConfigError(f"{method}: layers must name at least one block, or be None for all blocks")
    for index in layers:
        if not isinstance(index, int) or isinstance(index, bool):
            raise ConfigError(f"{method}: layers must be block indices (negative: from the end), got {layers}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{method}: layers has repeated blocks: {layers}")
    return layers


def resolve_blocks(layers: Sequence[int] | None, depth: int, method: str) -> list[int]:
    """The block indices a ``layers`` option selects on a backbone with ``depth`` blocks (negatives resolved)."""
    if layers is None:
        return list(range(depth))
    outside = [i for i in layers if not -depth <= i < depth]
    if outside:
        raise ConfigError(
            f"{method}: layers {outside} do not exist; the backbone has blocks 0..{depth - 1} (or -{depth}..-1)"
        )
    blocks = [i % depth for i in layers]
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"{method}: layers {list(layers)} name the same block twice on a {depth}-block backbone")
    return blocks


def adapted_blocks(adapter: BackboneAdapter, layers: Sequence[int] | None, method: str) -> list[int]:
    """The transformer blocks a ``layers`` option selects on any family that has blocks (ViTs, Swin)."""
    try:
        depth = len(adapter.blocks)
    except BackboneError as error:
        raise ConfigError(f"{method}: {error}") from None
    return resolve_blocks(layers, depth, method)


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    rank: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the LoRA branch's input only
    targets: list[Literal["q", "k", "v"]] = dataclasses.field(default_factory=lambda: ["q", "v"])
    layers: list[int] | None = None  # block indices; None: every block

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora: rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora: alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        targets = list(self.targets)
        if not targets or any(t not in QKV for t in targets) or len(set(targets)) != len(targets):
            raise ConfigError(f"lora: targets must be distinct entries of {list(QKV)}, got {targets}")
        self.targets = targets
        self.layers = check_block_list(self.layers, "lora")


@register_method
class LoRA(Method):
    name = "lora"
    table_rank = 4
    config_class = LoRAConfig
    paper = "LoRA (Hu et al., ICLR 2022)"
    identity_at_init = True
    test_options = {"rank": 2}
    # On EVA/BEiT/SwinV2 the wrapped qkv makes timm add the q/v biases as a separate sum (one more rounding
    # than its fused F.linear); merging adds B A to W in float32 before the product instead of after it.
    rounding = Rounding(at_init=1e-5, merged=1e-5)

    @classmethod
    def supports(cls, adapter: BackboneAdapter) -> bool:
        """ViTs, and staged families whose transformer blocks the adapter lists (Swin)."""
        return adapter.kind in cls.supported_kinds or adapter.has_transformer_blocks

    def __init__(self, config: LoRAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        # The layers live in the backbone (shared with other LoRA adapters); this plain list (not submodules)
        # lets merge() find them.
        self._lora_layers: list[FusedLoRALinear] = []

    def attach(self, backbone: nn.Module) -> None:
        config: LoRAConfig = self.config
        parts = sorted(QKV.index(t) for t in config.targets)
        adapter = adapter_for(backbone)
        for index in adapted_blocks(adapter, config.layers, self.name):
            try:
                attn, _ = adapter.qkv_slot(index, self.injections)
            except BackboneError as error:
                raise ConfigError(f"lora: cannot adapt block {index}: {error}") from None
            qkv = unwrap_base_layers(getattr(attn, "qkv", None) or nn.Identity())
            if not isinstance(qkv, (nn.Linear, nn.Conv2d)):
                raise ConfigError(
                    f"lora: block {index} has no fused qkv (an nn.Linear or 1x1 nn.Conv2d into q, k and v) to adapt"
                )
            width = qkv.weight.shape[1]
            if config.rank > width:  # B A would have more parameters than a full update, no more rank
                raise ConfigError(
                    f"lora: rank {config.rank} exceeds the width {width} of block {index}'s qkv; an "
                    f"update of that size has rank at most {width}, choose rank <= {width} "
                    "(--method.rank)"
                )
            make = functools.partial(FusedLoRALinear, routing=self.routing, heads=adapter.qkv_head_first(index))
            try:
                layer = self.injections.layer(attn, "qkv", FusedLoRALinear, make)
            except ValueError:
                raise ConfigError(
                    f"lora: block {index} has no fused qkv (an nn.Linear or 1x1 nn.Conv2d into q, k and v) to adapt"
                ) from None
            layer.add_adapter(
                self.adapter_name, parts, rank=config.rank, alpha=config.alpha, dropout=config.dropout
            )
            self._lora_layers.append(layer)

    def tuned_from_block(self) -> int:
        """Blocks before the first adapted one are frozen (0 with the default ``layers=None``; 0 on staged
        families, whose only cache cut is after the last stage)."""
        if self.geometry.kind != "vit":
            return 0
        return min(resolve_blocks(self.config.layers, self.geometry.depth, self.name))

    def factors(self) -> list[LoRAFactors]:
        """This adapter's update in each adapted ``qkv``, block by block."""
        return [layer.lora[self.adapter_name] for layer in self._lora_layers]

    def peft_form(self, backbone: nn.Module) -> PeftForm:
        """peft's LoRA on each whole fused ``qkv`` (docs/export.md): rank ``len(targets) * rank``, A stacked, B block
        structured (zeros on the rows of parts not adapted), ``lora_alpha = alpha * len(targets)`` (the same
        scale ``alpha / rank``)."""
        # timm's names of the projections (the levels of other adapters' wrappers dropped)
        names = {
            id(m): ".".join(part for part in n.split(".") if part != "base_layer") for n, m in backbone.named_modules()
        }
        factors = self.factors()
        first = factors[0]
        count = len(first.parts)
        tensors = {}
        for layer, own in zip(self._lora_layers, factors, strict=True):
            name = names[id(layer)]
            tensors[f"{name}.lora_A.weight"] = own.lora_A.detach().reshape(count * own.rank, -1)
            tensors[f"{name}.lora_B.weight"] = own.stacked_lora_B().detach()
        config = {
            "r": count * first.rank,
            "lora_alpha": first.alpha * count,
            "lora_dropout": first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0,
            "target_modules": sorted(names[id(layer)] for layer in self._lora_layers),
            "bias": "none",
        }
        return PeftForm(config, tensors)

    @property
    def merged(self) -> bool:
        return any(layer.lora[self.adapter_name].merged for layer in self._lora_layers)

    def merge(self) -> None:
        """Fold every update into its frozen ``qkv`` weight; merging twice is a no-op."""
        for layer in self._lora_layers:
            layer.merge(self.adapter_name)

    def unmerge(self) -> None:
        """Subtract the updates again; a no-op when not merged."""
        for layer in self._lora_layers:
            layer.unmerge(self.adapter_name)

    @classmethod
    def expected_num_parameters(cls, config: LoRAConfig, geometry: Geometry) -> int | None:
        if geometry.kind != "vit":
            return None
        blocks = geometry.depth if config.layers is None else len(config.layers)
        return blocks * len(config.targets) * config.rank * 2 * geometry.embed_dim
