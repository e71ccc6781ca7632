"""A timm ViT block that computes the outputs of only some of its tokens; every token still serves as key/value.

Some outputs of a block are thrown away by whatever comes next: deep VPT replaces the previous block's prompt
outputs with fresh prompts, and the final norm never sees prompt tokens. Their queries, attention rows,
output projection and MLP are wasted work (about 9/12 of a token's cost in a ViT block). This module runs a
timm ``Block`` the same way as its own ``forward`` but only for the rows a ``select`` function keeps::

    h = norm1(x);  q, k, v = qkv(h)              # keys and values for every token
    a = proj(norm(SDPA(select(q), k, v)))         # attention output for the kept tokens only
    y = select(x) + ls1(a);  y = y + ls2(mlp(norm2(y)))

so ``forward_selected_tokens(block, x, select) == select(block(x))`` up to float rounding. Only the exact
timm ``Block`` qualifies (:func:`supports_selected_tokens`), with timm's plain ``Attention`` or an attention
module that computes selected query rows itself (``forward_selected(x, select)``, EPT's prompted attention);
other blocks keep their own forward. Module calls go through ``attn.qkv``, ``attn.proj`` and ``mlp`` (so
LoRA-wrapped layers and hooks on those modules still apply), but ``block.attn`` itself is not called: hooks on
it do not fire.

Users: token prompts (drop the prompt outputs that the next block replaces) and ``PromptModel``'s class-token
readout (the last block computes only the row the ``'token'`` pool reads).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn


def supports_selected_tokens(block: nn.Module) -> bool:
    """True for timm's plain ViT ``Block`` whose attention is timm's ``Attention`` or has ``forward_selected``."""
    if type(block) is not Block:
        return False
    attn = getattr(block, "attn", None)
    return type(attn) is Attention or callable(getattr(attn, "forward_selected", None))


def class_token_row(tokens: torch.Tensor) -> torch.Tensor:
    """Row 0 of the token axis (-2), kept as a length-1 axis: what timm's ``'token'`` pool reads."""
    return tokens[..., :1, :]


def drop_token_range(tokens: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Remove tokens ``start .. start + count - 1`` from the token axis (-2) of (..., tokens, dim)."""
    return torch.cat([tokens[..., :start, :], tokens[..., start + count :, :]], dim=-2)


def attention_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a timm fused-qkv ``Attention`` for input x, each (B, heads, N, head_dim), q/k norms applied."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def forward_selected_tokens(
    block: nn.Module, x: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``select(block(x))`` computed without the dropped rows; ``select`` acts on the token axis (-2)."""
    attn = block.attn
    h = block.norm1(x)
    if type(attn) is Attention:
        out = _attention_selected(attn, h, select)
    else:
        out = attn.forward_selected(h, select)
    y = select(x) + block.drop_path1(block.ls1(out))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def _attention_selected(
    attn: Attention, h: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``select(attn(h))`` for timm's ``Attention``: keys and values of every row, queries of the kept ones."""
    q, k, v = attention_heads(attn, h)
    out = F.scaled_dot_product_attention(
        select(q), k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
    )
    out = attn.norm(out.transpose(1, 2).flatten(2))
    if attn.gate is not None:
        out = out * attn.gate(select(h)).sigmoid()
    return attn.proj_drop(attn.proj(out))
