"""SPT: VPT whose prompts start as tokens of the training images (docs/methods.md, SPT).

The architecture is VPT's (``[CLS, prompts, patches]``, deep prompts replace the previous prompt outputs,
prompts removed before the final norm); SPT uses **no prompt dropout**. Before training the engine calls
``initialize_from_data``, which runs the frozen backbone without prompts over training images and sets
the prompts of layer ``i`` from the tokens layer ``i`` receives (layer 0: patch embeddings before the
position embedding; layer ``i >= 1``: block ``i``'s input without CLS), see
:mod:`promptvit.layers.prompt_init`. Until then the prompts hold VPT's uniform init.

Layer-0 tokens: the official code samples ``patch_embed``'s output, before the position embedding
(``layer0_tokens="patch_embed"``, the default); the paper's eq. 1 calls the position-embedded tokens E_0,
which reads as after it (``layer0_tokens="pos_embed"``). The two disagree; both are offered.

On Swin the prompts take VPT's route through the windows and layer ``i``'s tokens are block ``i``'s input
map in raster order (docs/methods.md, "VPT on Swin").

Recipes of the paper: deep ``prompt_length=20`` (the default here), shallow ``prompt_length=100``.
``frozen_prompts=True`` is the paper's ablation where only the head is trained after the data init.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from promptvit.layers.prompt_init import SAMPLERS, sample_prompt_tokens
from promptvit.methods.base import ConfigError, MethodConfig, register_method
from promptvit.methods.vpt import VPT


@dataclasses.dataclass
class SPTConfig(MethodConfig):
    prompt_length: int = 20  # K per prompted block; the paper uses 20 deep, 100 shallow
    deep: bool = True
    dropout: float = 0.0  # SPT has no prompt dropout
    sampler: Literal["random", "mean_pool", "max_pool", "kmeans"] = "random"
    max_images: int = 1024  # at most this many training images are forwarded for the init
    max_kmeans_tokens: int = 20000  # per-layer token pool for k-means (max_kmeans_tokens * d * 4 bytes)
    seed: int = 0  # of the token sampling (and k-means)
    # layer-0 tokens: before the position embedding (official code) or after it (the paper's eq. 1)
    layer0_tokens: Literal["patch_embed", "pos_embed"] = "patch_embed"
    frozen_prompts: bool = (
        False  # the paper's ablation: prompts stay at their data init, only the head trains
    )

    def validate(self) -> None:
        if self.prompt_length < 1:
            raise ConfigError(f"spt: prompt_length must be >= 1, got {self.prompt_length}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"spt: dropout must be in [0, 1), got {self.dropout}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"spt: sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.layer0_tokens not in ("patch_embed", "pos_embed"):
            raise ConfigError(f"spt: layer0_tokens must be 'patch_embed' or 'pos_embed', got {self.layer0_tokens!r}")
        if self.max_images < 1:
            raise ConfigError(f"spt: max_images must be >= 1, got {self.max_images}")
        if self.max_kmeans_tokens < self.prompt_length:
            raise ConfigError(
                f"spt: max_kmeans_tokens ({self.max_kmeans_tokens}) must be >= prompt_length ({self.prompt_length})"
            )


@register_method
class SPT(VPT):
    """Self-Prompt Tuning; ``prompts`` has shape (depth if deep else 1, K, d)."""

    name = "spt"
    table_rank = 12
    config_class = SPTConfig
    paper = "SPT: Self-Prompt Tuning (Wang et al., ICML 2024)"
    test_options = {"prompt_length": 2}
    needs_data_init = True

    config: SPTConfig

    @torch.no_grad()
    def initialize_from_data(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
        """Replace the prompts by sampled tokens; returns the cost (seconds, images, tokens)."""
        started = time.perf_counter()
        config = self.config
        layers = list(range(self.num_prompted_blocks))
        sample = sample_prompt_tokens(
            model,
            batches,
            layers,
            config.prompt_length,
            config.sampler,
            max_images=config.max_images,
            max_kmeans_tokens=config.max_kmeans_tokens,
            seed=config.seed,
            layer0=config.layer0_tokens,
        )
        for block, rows in enumerate(sample.tokens):
            self.prompts[block].copy_(rows.to(self.prompts[block].device, self.prompts[block].dtype))
        info = sample.info("spt_")
        info["spt_seconds"] = round(time.perf_counter() - started, 4)
        info["spt_sampler"] = config.sampler
        return info
