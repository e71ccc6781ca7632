"""Adapter for timm ``Beit`` (BEiT, BEiT v2: relative position bias per block or shared).

Inserted tokens (prompts) go after the class token and get a **zero** relative-position bias, towards and
from every token; the bias among the class and patch tokens stays exactly timm's. Beit's attention builds
its own bias with ``_get_rel_pos_bias()`` (timm private) inside its forward, so while a token-prompt method
is attached that attribute is replaced by one that pads the bias with zero rows and columns; the shared
bias (a keyword argument) is padded by a pre-hook. Both are entries of the method's ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.models.beit import Beit
from torch import nn

from promptvit.backbones.base import (
    AttentionParts,
    BackboneError,
    PartsFromCall,
    TimmTokenAdapter,
    register_adapter,
    unwrap_base_layers,
)
from promptvit.backbones.eva import separate_qkv_bias, switch_to_module_call
from promptvit.backbones.geometry import Geometry
from promptvit.backbones.vit import mlp_hidden_width


def pad_bias(bias: torch.Tensor, position: int, count: int) -> torch.Tensor:
    """``(..., N, N)`` bias -> ``(..., N + count, N + count)`` with zero rows and columns at ``position``."""
    if count <= 0:
        return bias
    *lead, n, _ = bias.shape
    bias = torch.cat(
        [bias[..., :position, :], bias.new_zeros(*lead, count, n), bias[..., position:, :]], dim=-2
    )
    return torch.cat(
        [bias[..., :position], bias.new_zeros(*lead, n + count, count), bias[..., position:]], dim=-1
    )


class ZeroBiasForInsertedTokens:
    """Pads one attention's relative position bias for the tokens inserted at ``position``.

    ``own_bias`` is the call that gives the attention its own bias (to be replaced by :meth:`padded_own_bias`);
    a bias shared by all blocks arrives as the keyword argument ``shared_keyword`` and is padded by
    :meth:`count_and_pad_shared`, a forward pre-hook (with keyword arguments) on the attention.
    """

    def __init__(
        self,
        own_bias: Callable[[], torch.Tensor] | None,
        position: int,
        tokens_without_prompts: int,
        shared_keyword: str = "shared_rel_pos_bias",
    ) -> None:
        self.position, self.tokens = position, tokens_without_prompts
        self.inserted = 0
        self.own_bias = own_bias
        self.shared_keyword = shared_keyword

    def count_and_pad_shared(self, attn: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
        self.inserted = args[0].shape[1] - self.tokens
        shared = kwargs.get(self.shared_keyword)
        if shared is not None:
            kwargs = {**kwargs, self.shared_keyword: pad_bias(shared, self.position, self.inserted)}
        return args, kwargs

    def padded_own_bias(self) -> torch.Tensor:
        return pad_bias(self.own_bias(), self.position, self.inserted)

    def reset(self, attn: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """After the call: no tokens inserted, for a later call that does not go through the module (a
        prompted attention of another adapter reads the bias directly)."""
        self.inserted = 0


def relative_bias_attention_parts(attn: nn.Module, call: dict[str, Any]) -> AttentionParts:
    """The parts of a Beit ``Attention`` for one call: its own relative position bias plus the shared one.

    As timm: q/v biases added to the fused projection, no q/k norms, ``bias = own + shared`` added to the
    scaled logits (either may be absent).
    """
    bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
    shared = call.get("shared_rel_pos_bias")
    if shared is not None:
        bias = shared if bias is None else bias + shared
    num_heads = int(attn.num_heads)
    return AttentionParts(
        module=attn,
        qkv=attn.qkv,
        num_heads=num_heads,
        head_dim=unwrap_base_layers(attn.qkv).out_features // (3 * num_heads),
        scale=float(attn.scale),
        q_norm=nn.Identity(),
        k_norm=nn.Identity(),
        attn_drop=attn.attn_drop,
        norm=nn.Identity(),
        gate=None,
        proj=attn.proj,
        proj_drop=attn.proj_drop,
        qkv_bias=separate_qkv_bias(attn),
        logit_bias=bias,
    )


@register_adapter(Beit)
class BeitAdapter(TimmTokenAdapter):
    family = "Beit"
    tiny_builds = {
        "beit": (
            "beit_base_patch16_224",
            dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
            16,
        )
    }

    model: Beit

    def geometry(self) -> Geometry:
        model = self.model
        attn = unwrap_base_layers(model.blocks[0].attn)
        return self.token_geometry(
            num_heads=int(attn.num_heads),
            mlp_hidden=mlp_hidden_width(model.blocks[0].mlp),
            qkv_bias=attn.q_bias is not None,
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        return model.pos_drop(x)

    def block_arguments(self, image_size: tuple[int, int] | None = None) -> Callable[[int], dict[str, Any]]:
        shared = self.model.rel_pos_bias() if self.model.rel_pos_bias is not None else None
        return lambda index: {"shared_rel_pos_bias": shared}

    def attention(self, block: int) -> AttentionParts:
        raise BackboneError(
            f"{type(self.model).__name__} adds a relative position bias inside its attention; "
            "it has no plain attention parts"
        )

    def attention_parts_from_call(self, block: int) -> PartsFromCall:
        return relative_bias_attention_parts

    def qkv_slot(self, block: int, injections: Any = None) -> tuple[nn.Module, str]:
        attn = unwrap_base_layers(self.model.blocks[block].attn)
        switch_to_module_call(attn, injections, type(self.model).__name__)
        return attn, "qkv"

    def tuned_with_last_blocks(self) -> list[nn.Module]:
        return [self.model.norm, self.model.fc_norm]

    def prefix_state_names(self, cut: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        stem = ("patch_embed.", "cls_token", "pos_embed", "rel_pos_bias.")
        return stem, tuple(f"blocks.{i}." for i in range(cut))

    def prefix_modules(self, cut: int) -> list[nn.Module]:
        model = self.model
        return [model.patch_embed, model.rel_pos_bias, *model.blocks[:cut]]

    def prepare_inserted_tokens(self, injections: Any) -> None:
        tokens = self.model.num_prefix_tokens + self.model.patch_embed.num_patches
        for block in self.model.blocks:
            attn = unwrap_base_layers(block.attn)
            padding = ZeroBiasForInsertedTokens(attn._get_rel_pos_bias, self.prompt_position, tokens)
            # keyed: every token-prompt adapter needs them once (the first one's padding serves all)
            injections.pre_hook(attn, padding.count_and_pad_shared, with_kwargs=True, key="inserted tokens")
            injections.hook(attn, padding.reset, key="inserted tokens")
            if attn.relative_position_bias_table is not None:
                injections.replace(attn, "_get_rel_pos_bias", padding.padded_own_bias, key="inserted tokens")
