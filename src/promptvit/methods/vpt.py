"""VPT: learnable prompt tokens after the prefix tokens, in the first block (shallow) or in every block (deep).

As in the official code (docs/methods.md, VPT): the prompts go in after the patch and position embedding (so they get no
position embedding), as ``[CLS/registers, prompts, patches]``; deep prompts replace the previous block's
prompt outputs before each block i >= 1; prompts are initialised ``U(-v, v)`` with
``v = sqrt(6 / (3 p^2 + d))``; prompt dropout (0.1 in the paper runs) is applied at every insertion and is
the only dropout active while training (the frozen backbone stays in eval mode). The prompts are removed
before the final norm, so ``global_pool='token'`` reads CLS and ``'avg'`` averages the patch tokens only.

On Swin (docs/methods.md, "VPT on Swin") the prompts go into every window of a block, their width is the
block's stage width (one (L, d_i) tensor per prompted block, ``prompts[i]``), ``d`` in the bound is the
first stage's width for every stage, and the head averages prompts and patches, as the authors' code does.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from promptvit.backbones import BackboneAdapter, Geometry, adapter_for
from promptvit.layers.token_prompts import (
    BlockPrompts,
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

    @classmethod
    def supports(cls, adapter: BackboneAdapter) -> bool:
        return adapter.supports_token_prompts

    def attach(self, backbone: nn.Module) -> None:
        adapter = adapter_for(backbone)
        device, dtype = reference_device_dtype(backbone)
        #: the blocks that put in prompts: every block (deep) or the first
        self.num_prompted_blocks = len(adapter.blocks) if self.config.deep else 1
        widths = [adapter.block_width(block) for block in range(self.num_prompted_blocks)]
        # VPT's bound from the patch size and the width of the first block's tokens (Swin: for every stage)
        bound = (adapter.patch_size, widths[0])
        length = self.config.prompt_length
        if len(set(widths)) == 1:  # (blocks, L, d), one draw for all
            prompts = init_vpt_uniform_(torch.empty(len(widths), length, widths[0], device=device, dtype=dtype), *bound)
            if self.config.frozen_prompts:
                self.register_buffer("prompts", prompts)
            else:
                self.prompts = nn.Parameter(prompts)
        else:  # one (L, d_i) tensor per block
            tensors = [init_vpt_uniform_(torch.empty(length, w, device=device, dtype=dtype), *bound) for w in widths]
            self.prompts = BlockPrompts(tensors, trainable=not self.config.frozen_prompts)
        self.register_token_prompts(backbone, {block: length for block in range(self.num_prompted_blocks)})

    def block_prompts(self, block: int, x: torch.Tensor) -> torch.Tensor:
        return expand_prompts(self.prompts[block], x.shape[0], self.prompt_dropout)

    @classmethod
    def prompted_depth(cls, config: VPTConfig, depth: int) -> int | None:
        return depth if config.deep else 1

    @classmethod
    def expected_num_parameters(cls, config: VPTConfig, geometry: Geometry) -> int | None:
        if config.frozen_prompts:
            return 0
        if geometry.kind != "vit":  # Swin: one width per stage, not in the geometry
            return None
        blocks = geometry.depth if config.deep else 1
        return blocks * config.prompt_length * geometry.embed_dim
