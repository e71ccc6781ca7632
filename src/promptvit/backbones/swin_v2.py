"""Adapter for timm ``SwinTransformerV2``: Swin's stages and windows with SwinV2's attention and post-norms.

What differs from Swin (:mod:`promptvit.backbones.swin`, whose adapter this one extends):

* attention is cosine attention: ``logits = s_h * cos(q, k) + 16 * sigmoid(b)`` with a learned per-head
  scale ``s_h = exp(min(logit_scale, log 100))`` and ``b`` the continuous relative position bias (an MLP over
  log-spaced relative coordinates); the q and v biases sit outside the bias-free ``qkv`` (k has none).
  :func:`cosine_window_attention_parts` reads this as :class:`AttentionParts`: q and k normalised to unit
  length, q times ``s_h``, scale 1, the position bias (plus the shift mask) as the logit bias;
* the residual branches are post-norm: ``x + norm1(attention(x))`` and ``x + norm2(mlp(x))``;
* patch merging projects, then normalises.

timm computes ``F.linear(x, qkv.weight, [q_bias | 0 | v_bias])``, which would bypass a wrapped ``qkv``; LoRA
and hooks on it switch the attention to timm's ``qkv_bias_separate`` (``qkv(x) + bias``, the same sum) in the
method's ledger, as on EVA and BEiT.

Prompt tokens (VPT, SPT) take Swin's route through the windows, with the cosine attention and the post-norms
as every token. Their position bias, to and from every token, is ``16 * sigmoid(0) = 8``, the bias of an MLP
output of zero, the middle of the bias's range (0, 16), not Swin's 0: here every bias is positive, and 0
would leave each prompt about 8 logits behind every patch (docs/methods.md, "VPT on Swin").
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import nn

from promptvit.backbones.base import AttentionParts, register_adapter, unwrap_base_layers
from promptvit.backbones.eva import separate_qkv_bias, switch_to_module_call
from promptvit.backbones.swin import SwinAdapter


class UnitLength(nn.Module):
    """Each head's vectors L2-normalised (dim -1), then times ``scale`` (broadcast over heads) if given."""

    def __init__(self, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = F.normalize(t, dim=-1)
        return t if self.scale is None else t * self.scale


def continuous_position_bias(attn: nn.Module) -> torch.Tensor:
    """SwinV2's relative position bias (1, heads, N, N): ``16 * sigmoid`` of the MLP over the coordinates."""
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
    area = attn.window_size[0] * attn.window_size[1]
    bias = table[attn.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1)
    return (16 * torch.sigmoid(bias)).unsqueeze(0)


def cosine_window_attention_parts(attn: nn.Module, call: dict[str, Any]) -> AttentionParts:
    """The parts of SwinV2's ``WindowAttention`` for one call (``mask``: its shift mask, or none)."""
    num_heads = int(attn.num_heads)
    logit_scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()
    bias = continuous_position_bias(attn)
    mask = call.get("mask")
    if mask is not None:
        bias = bias + mask.unsqueeze(1).to(bias.dtype)
    return AttentionParts(
        module=attn,
        qkv=attn.qkv,
        num_heads=num_heads,
        head_dim=unwrap_base_layers(attn.qkv).out_features // (3 * num_heads),
        scale=1.0,
        q_norm=UnitLength(logit_scale),
        k_norm=UnitLength(),
        attn_drop=attn.attn_drop,
        norm=nn.Identity(),
        gate=None,
        proj=attn.proj,
        proj_drop=attn.proj_drop,
        qkv_bias=separate_qkv_bias(attn),
        logit_bias=bias,
    )


@register_adapter(SwinTransformerV2)
class SwinV2Adapter(SwinAdapter):
    """SwinV2: Swin's layout (``patch_embed``, stages ``layers[i]``, ``norm``), cosine window attention."""

    family = "SwinTransformerV2"
    tiny_builds = {
        "swinv2": (
            "swinv2_tiny_window8_256",
            dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 1), num_heads=(1, 2)),
            32,
        ),
    }
    post_norm = True
    prompt_position_bias = 16 * 0.5  # 16 * sigmoid(0)
    window_parts = staticmethod(cosine_window_attention_parts)

    def qkv_slot(self, block: int, injections: Any = None) -> tuple[nn.Module, str]:
        attn = unwrap_base_layers(self.blocks[block].attn)
        switch_to_module_call(attn, injections, type(self.model).__name__)
        return attn, "qkv"

    def merge_prompts(self, merging: nn.Module, prompts: torch.Tensor) -> torch.Tensor:
        return merging.norm(merging.reduction(torch.cat([prompts] * 4, dim=-1)))
