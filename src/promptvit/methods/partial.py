"""Partial-k: the last k blocks (and the final norm) are tuned."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator

from torch import nn

from promptvit.backbones import Geometry, adapter_for
from promptvit.methods.base import ConfigError, Method, MethodConfig, register_method

#: why a backbone may have no stages at all (a timm model seen only through timm's generic contract)
NO_STAGES = " (promptvit finds a model's stages in timm's feature_info, which names none of its modules)"


@dataclasses.dataclass
class PartialConfig(MethodConfig):
    num_blocks: int = 1  # k: ViT blocks, or CNN stages, counted from the top

    def validate(self) -> None:
        if self.num_blocks < 1:
            raise ConfigError(f"partial: num_blocks must be >= 1, got {self.num_blocks}")


@register_method
class Partial(Method):
    name = "partial"
    table_rank = 2
    config_class = PartialConfig
    paper = "Partial-k (Yosinski et al. 2014; baseline in VPT and EPT)"
    supported_kinds = ("vit", "cnn")
    identity_at_init = True
    counts_standard_blocks = True

    def _tuned_modules(self, backbone: nn.Module) -> list[nn.Module]:
        k = self.config.num_blocks
        unit = "blocks" if self.geometry.kind == "vit" else "stages"
        if k > self.geometry.depth:
            raise ConfigError(
                f"partial: num_blocks={k} exceeds the {self.geometry.depth} {unit} of {self.geometry.architecture}"
                + (NO_STAGES if self.geometry.depth == 0 else "")
            )
        adapter = adapter_for(backbone)
        if adapter.kind == "vit":
            return [*adapter.blocks[-k:], *adapter.tuned_with_last_blocks()]
        return adapter.last_stages(k)

    def backbone_parameters_to_tune(self, backbone: nn.Module) -> Iterator[nn.Parameter]:
        return itertools.chain.from_iterable(m.parameters() for m in self._tuned_modules(backbone))

    def modules_in_train_mode(self, backbone: nn.Module) -> Iterable[nn.Module]:
        return self._tuned_modules(backbone)

    def tuned_from_block(self) -> int:
        """The last k blocks are tuned (ViT); CNN stages are not cached (0)."""
        if self.geometry.kind != "vit":
            return 0
        return max(self.geometry.depth - self.config.num_blocks, 0)

    @classmethod
    def expected_num_parameters(cls, config: PartialConfig, geometry: Geometry) -> int | None:
        if geometry.kind != "vit":
            return None
        return config.num_blocks * geometry.vit_block_parameters() + 2 * geometry.embed_dim
