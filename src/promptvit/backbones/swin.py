"""Adapter for timm ``SwinTransformer``: stages of window-attention blocks, and prompt tokens in every window.

Swin's blocks take (B, H, W, C) maps and attend within windows of the map, shifted by half a window every
other block; every stage but the first starts with patch merging (each 2x2 neighbourhood concatenated,
normed and projected to twice the width). promptvit uses Swin three ways:

* like a CNN (``kind == "cnn"``): its stages, the norm after them and the pixel input, for the methods that
  need nothing else (linear, full, partial, bias, norm, MLP head, activation prompts, VP padding);
* as transformer blocks: each block's fused ``qkv``, MLP and window attention (:func:`window_attention_parts`:
  the relative position bias plus, in shifted blocks, the shift mask, one per window) for LoRA, adapters and
  EPT (its prompt has one row per position of a window, shared by all windows);
* with prompt tokens carried the way the VPT authors' ``PromptedSwinTransformer`` carries them
  (docs/methods.md, "VPT on Swin"): per image ``[prompts, patches]``; in a block the image's prompts go in
  front of the tokens of every one of its windows (shifted windows too) with zero relative position bias
  (SwinV2: see its module) and zero shift mask to and from every token, and a prompt's attention output is
  the mean of its outputs over those windows; residuals, norms and the MLP act on prompts as on patches;
  patch merging concatenates each prompt with itself four times before the stage's norm and reduction; a
  block that puts in prompts drops those in the stream; the final norm and the head's pooling see prompts
  and patches together.

The model's block loop runs Swin through this adapter (:meth:`SwinAdapter.forward_blocks`): patch merging
and blocks stage by stage, as timm's stages do, with the plan's prompts beside the map; a block without
prompts in its input runs as timm's module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, window_partition, window_reverse
from torch import nn
from torch.utils.checkpoint import checkpoint

from promptvit.backbones.base import (
    AttentionParts,
    BackboneAdapter,
    BlockPlan,
    PartsFromCall,
    all_rows,
    attend,
    mlp_ratio,
    register_adapter,
    size_option,
    unwrap_base_layers,
)
from promptvit.backbones.geometry import Geometry
from promptvit.backbones.vit import timm_attention_parts


def prompt_logit_bias(bias: torch.Tensor, count: int, value: float = 0.0) -> torch.Tensor:
    """A window's logit bias (..., N, N) with ``count`` prompts in front: ``value`` from and to every prompt
    (the authors' code pads Swin's relative position bias and shift mask with zeros)."""
    return F.pad(bias, (count, 0, count, 0), value=value)


def window_attention_parts(attn: nn.Module, call: dict[str, Any]) -> AttentionParts:
    """The parts of Swin's ``WindowAttention`` for one call: the relative position bias (1, heads, N, N) plus
    the call's shift mask (windows, N, N) as a per-window logit bias, as timm adds them."""
    bias = attn._get_rel_pos_bias()
    mask = call.get("mask")
    if mask is not None:
        bias = bias + mask.unsqueeze(1).to(bias.dtype)
    return dataclasses.replace(timm_attention_parts(attn), logit_bias=bias)


@register_adapter(SwinTransformer)
class SwinAdapter(BackboneAdapter):
    """Swin: ``patch_embed``, stages ``layers[i]`` (patch merging, then window-attention blocks), ``norm``."""

    kind = "cnn"
    family = "SwinTransformer"
    kind_note = (
        "DA-VPT guides its prompts with the class token's query and reads them at one place of one token "
        "sequence, while Swin has no class token and holds a copy of its prompts in every window"
    )
    tiny_builds = {
        "swin": (
            "swin_tiny_patch4_window7_224",
            dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 1), num_heads=(1, 2)),
            32,
        ),
    }
    #: SwinV2 normalises the outputs of attention and MLP (post-norm); Swin their inputs
    post_norm: ClassVar[bool] = False
    #: the position bias of a prompt to and from every token: none (the authors' zero padding)
    prompt_position_bias: ClassVar[float] = 0.0
    #: the parts of a block's window attention for one call (its shift mask as the keyword ``mask``)
    window_parts: ClassVar[PartsFromCall] = staticmethod(window_attention_parts)
    has_transformer_blocks = True
    routes_token_prompts = True

    def geometry(self) -> Geometry:
        model = self.model
        return Geometry(
            kind="cnn",
            architecture=type(model).__name__,
            embed_dim=model.num_features,
            depth=len(self.stages),
            img_size=tuple(model.patch_embed.img_size),
            patch_size=(1, 1),
            global_pool=str(model.global_pool),
        )

    derived_options = ("mlp_ratio",)

    def observed_options(self) -> dict[str, Any]:
        first = [unwrap_base_layers(stage.blocks[0]) for stage in self.stages]
        embed_dim = int(self.model.patch_embed.proj.out_channels)
        hidden = unwrap_base_layers(first[0].mlp).fc1.out_features
        return {
            **super().observed_options(),
            "img_size": size_option(tuple(self.model.patch_embed.img_size)),
            "patch_size": size_option(tuple(self.model.patch_embed.patch_size)),
            "window_size": size_option(tuple(first[0].window_size)),
            "embed_dim": embed_dim,
            "depths": [len(stage.blocks) for stage in self.stages],
            "num_heads": [int(unwrap_base_layers(block.attn).num_heads) for block in first],
            "mlp_ratio": mlp_ratio(hidden, embed_dim),
            "global_pool": str(self.model.global_pool),
        }

    def input_module(self) -> nn.Module:
        return self.model.patch_embed

    @property
    def patch_embed(self) -> nn.Module:
        return self.model.patch_embed

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.model.layers)

    def after_stages(self) -> list[nn.Module]:
        return [self.model.norm]

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """Every window-attention block, stage by stage (their widths grow from stage to stage)."""
        return [block for stage in self.model.layers for block in stage.blocks]

    def block_width(self, block: int) -> int:
        return self.blocks[block].dim

    def attention_tokens(self, block: int) -> int:
        return self.blocks[block].window_area

    def attention(self, block: int) -> AttentionParts:
        """The parts of an unshifted call (a shifted block adds its mask per call)."""
        return self.window_parts(unwrap_base_layers(self.blocks[block].attn), {})

    def attention_parts_from_call(self, block: int) -> PartsFromCall:
        return self.window_parts

    def attention_slot(self, block: int) -> tuple[nn.Module, str]:
        return self.blocks[block], "attn"

    def qkv_slot(self, block: int, injections: Any = None) -> tuple[nn.Module, str]:
        # timm's WindowAttention calls ``self.qkv(x)`` as a module: a wrapped projection takes part as is.
        return unwrap_base_layers(self.blocks[block].attn), "qkv"

    def mlp_slot(self, block: int) -> tuple[nn.Module, str]:
        return self.blocks[block], "mlp"

    # ------------------------------------------------------------------ prompt tokens

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The (B, H, W, C) map the first stage receives."""
        return self.model.patch_embed(images)

    def forward_blocks(
        self,
        tokens: torch.Tensor,
        plan: BlockPlan | None = None,
        start: int = 0,
        end: int | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Patch merging and blocks, stage by stage, with ``plan``'s prompt tokens in every window.

        Returns the (B, H, W, C) map, or with prompts in the stream after the last block ``[prompts,
        patches]`` as one row of tokens, (B, 1, P + H * W, C), which the final norm and the head's pooling
        take as they take the map.
        """
        if start != 0 or end not in (None, len(self.blocks)):
            raise self._unsupported("block range to run (its only cache cut is after the last stage)")
        x = tokens
        prompts = x.new_zeros(x.shape[0], 0, x.shape[-1])
        index = 0
        for stage_index, stage in enumerate(self.model.layers):
            count = len(stage.blocks)
            inserting = plan is not None and any(plan.puts_in_prompts(index + i) for i in range(count))
            if not prompts.shape[1] and not inserting:
                x = stage(x)  # no prompt anywhere in the stage: timm's own module (hooks, checkpointing)
                index += count
                continue
            stage_input = x
            x = stage.downsample(x)
            if prompts.shape[1]:
                prompts = self.merge_prompts(stage.downsample, prompts)
            checkpointing = getattr(stage, "grad_checkpointing", False) and torch.is_grad_enabled()
            for block in stage.blocks:
                inserted = plan.inserts(index, x) if plan is not None else None
                if inserted is not None:
                    prompts = inserted.to(x.dtype)
                if not prompts.shape[1]:
                    x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
                else:
                    keep = not plan.skips_prompt_outputs(index)
                    run = functools.partial(self.prompted_block, block, keep_prompts=keep)
                    if checkpointing:
                        x, prompts = checkpoint(run, x, prompts, use_reentrant=False)
                    else:
                        x, prompts = run(x, prompts)
                index += 1
            plan.stage_done(stage_index, stage_input, x)
        if not prompts.shape[1]:
            return x
        batch, height, width, channels = x.shape
        return torch.cat([prompts, x.reshape(batch, height * width, channels)], dim=1).unsqueeze(1)

    def merge_prompts(self, merging: nn.Module, prompts: torch.Tensor) -> torch.Tensor:
        """Patch merging of prompt tokens (B, P, C): each one stands for all four neighbours of a 2x2 patch."""
        return merging.reduction(merging.norm(torch.cat([prompts] * 4, dim=-1)))

    def prompted_block(
        self, block: nn.Module, x: torch.Tensor, prompts: torch.Tensor, keep_prompts: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block on a (B, H, W, C) map with (B, P, C) prompt tokens: (map, prompt outputs).

        ``keep_prompts=False``: the prompts act as keys and values only and no prompt output is computed
        (an empty (B, 0, C) tensor comes back).
        """
        batch, height, width, channels = x.shape
        count = prompts.shape[1]
        kept = count if keep_prompts else 0
        tokens = torch.cat([prompts.to(x.dtype), x.reshape(batch, height * width, channels)], dim=1)
        inputs = tokens if self.post_norm else block.norm1(tokens)
        out = self._prompted_windows(
            block, inputs[:, count:].reshape(batch, height, width, channels), inputs[:, :count], keep_prompts
        )
        if self.post_norm:
            out = block.norm1(out)
        tokens = tokens[:, count - kept :] + block.drop_path1(out)
        if self.post_norm:
            tokens = tokens + block.drop_path2(block.norm2(block.mlp(tokens)))
        else:
            tokens = tokens + block.drop_path2(block.mlp(block.norm2(tokens)))
        return tokens[:, kept:].reshape(batch, height, width, channels), tokens[:, :kept]

    def _prompted_windows(
        self, block: nn.Module, x: torch.Tensor, prompts: torch.Tensor, keep_prompts: bool
    ) -> torch.Tensor:
        """Window attention of timm's block (shift, pad, windows, mask) with the prompts in every window.

        Returns (B, P + H * W, C) with the prompts' window means first, or (B, H * W, C) without them.
        """
        batch, height, width, channels = x.shape
        count = prompts.shape[1]
        shift, size = tuple(block.shift_size), tuple(block.window_size)
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = F.pad(x, (0, 0, 0, (-width) % size[1], 0, (-height) % size[0]))
        padded_height, padded_width = x.shape[1], x.shape[2]
        windows = window_partition(x, size).reshape(-1, size[0] * size[1], channels)
        num_windows = windows.shape[0] // batch
        mask = block.get_attn_mask(x) if getattr(block, "dynamic_mask", False) else block.attn_mask
        attn = unwrap_base_layers(block.attn)
        parts = self.window_parts(attn, {"mask": mask})
        bias = prompt_logit_bias(parts.logit_bias, count, self.prompt_position_bias)
        parts = dataclasses.replace(parts, logit_bias=bias)
        shared = prompts.unsqueeze(1).expand(batch, num_windows, count, channels)
        sequence = torch.cat([shared.reshape(batch * num_windows, count, channels), windows], dim=1)
        out = attend(parts, sequence, select=all_rows if keep_prompts else functools.partial(_after, count))
        kept = count if keep_prompts else 0
        windows = out[:, kept:].reshape(-1, size[0], size[1], channels)
        x = window_reverse(windows, size, padded_height, padded_width)[:, :height, :width]
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        x = x.reshape(batch, height * width, channels)
        if not keep_prompts:
            return x
        prompt_means = out[:, :count].reshape(batch, num_windows, count, channels).mean(dim=1)
        return torch.cat([prompt_means, x], dim=1)


def _after(count: int, tokens: torch.Tensor) -> torch.Tensor:
    """The rows after the first ``count`` (the prompts' queries dropped)."""
    return tokens[..., count:, :]
