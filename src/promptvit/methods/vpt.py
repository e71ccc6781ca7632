"""VPT: learnable prompt tokens after the prefix tokens, in the first block (shallow) or in every block (deep).

As in the official code (docs/methods.md, VPT): the prompts go in after the patch and position embedding (so they get no
position embedding), as ``[CLS/registers, prompts, patches]``; deep prompts replace the previous block's
prompt outputs before each block i >= 1; prompts are initialised ``U(-v, v)`` with
``v = sqrt(6 / (3 p^2 + d))``; prompt dropout (0.1 in the paper runs) is applied at every insertion and is
the only dropout active while training (the frozen backbone stays in eval mode). The prompts are removed
before the final norm, so ``global_pool='token'`` reads CLS and ``'avg'`` averages the patch tokens only.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from promptvit.backbones import Geometry
from promptvit.layers.token_prompts import (
    TokenPrompts,
    expand_prompts,
    init_vpt_uniform_,
    reference_device_dtype,
)
from promptvit.methods.base import ConfigError, Method, MethodConfig, register_method


@dataclasses.dataclass
class VPTConfig(MethodConfig):
    prompt_length: int = 10  # L tokens per prompted block
    deep: bool = True  # prompts in every block (True) or only before block 0 (False)
    dropout: float = 0.1  # prompt dropout; the official config default is 0, its paper runs use 0.1
    init: Literal["uniform"] = "uniform"  # VPT's U(-v, v); data-driven inits belong to SPT
    frozen_prompts: bool = False  # keep the prompts at their initial values (stored as a buffer, not tuned)

    def validate(self) -> None:
        if self.prompt_length < 1:
            raise ConfigError(f"vpt: prompt_length must be >= 1, got {self.prompt_length}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"vpt: dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("uniform",):
            raise ConfigError(f"vpt: init must be 'uniform', got {self.init!r}")


@register_method
class VPT(TokenPrompts, Method):
    """Visual Prompt Tuning; ``prompts`` has shape (depth if deep else 1, L, d)."""

    name = "vpt"
    table_rank = 9
    config_class = VPTConfig
    paper = "VPT: Visual Prompt Tuning (Jia et al., ECCV 2022)"
    supported_kinds = ("vit",)
    test_options = {"prompt_length": 2}

    config: VPTConfig

    def __init__(self, config: VPTConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.num_prefix_tokens = geometry.num_prefix_tokens
        self.prompt_dropout = nn.Dropout(config.dropout)

    @property
    def num_prompted_blocks(self) -> int:
        return self.geometry.depth if self.config.deep else 1

    def attach(self, backbone: nn.Module) -> None:
        device, dtype = reference_device_dtype(backbone)
        prompts = torch.empty(
            self.num_prompted_blocks,
            self.config.prompt_length,
            self.geometry.embed_dim,
            device=device,
            dtype=dtype,
        )
        self.init_prompts(prompts)
        if self.config.frozen_prompts:
            self.register_buffer("prompts", prompts)
        else:
            self.prompts = nn.Parameter(prompts)
        self.register_token_prompts(
            backbone, {block: self.config.prompt_length for block in range(self.num_prompted_blocks)}
        )

    def init_prompts(self, prompts: torch.Tensor) -> None:
        """Initialise the (blocks, L, d) prompt tensor in place (subclasses may override)."""
        init_vpt_uniform_(prompts, self.geometry.patch_size, self.geometry.embed_dim)

    def block_prompts(self, block: int, x: torch.Tensor) -> torch.Tensor:
        return expand_prompts(self.prompts[block], x.shape[0], self.prompt_dropout)

    @classmethod
    def prompted_depth(cls, config: VPTConfig, depth: int) -> int | None:
        return depth if config.deep else 1

    @classmethod
    def expected_num_parameters(cls, config: VPTConfig, geometry: Geometry) -> int | None:
        if config.frozen_prompts:
            return 0
        blocks = geometry.depth if config.deep else 1
        return blocks * config.prompt_length * geometry.embed_dim
