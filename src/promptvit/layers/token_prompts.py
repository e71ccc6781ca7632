"""Learnable tokens in the token stream of a timm ViT: insert, replace, strip (VPT, SPT, DA-VPT, AP-concat).

A prompted ViT sees ``[prefix tokens (CLS, registers), prompts, patches]``: prompts go in right after the
prefix tokens at the input of some block, deep variants swap the previous block's prompt outputs for fresh
prompts at later blocks, and all prompts are removed again before the final norm, so that ``global_pool``
(``'token'`` reads CLS, ``'avg'`` averages patches only) and the head see the usual sequence.

A family whose blocks do not take one token sequence carries the prompts beside its maps in its own block
loop (Swin: a copy in every window, see :mod:`promptvit.backbones.swin`); it takes the same schedule and
prompts from the plan, and its final norm sees what its loop gives it.

Prompt outputs that nobody reads are not computed: in a block whose prompt outputs the next block replaces
(deep prompts) or the final norm strips, prompts act as keys and values only and the block outputs the other
tokens (:mod:`promptvit.layers.selected_tokens`; timm's plain ``Block`` only, others run in full). The result
is the same; ``keeping_prompt_outputs()`` turns this off for tools that read those outputs (the analysis).

Two layers of API:

* tensor functions (``insert_prompts``, ``replace_prompts``, ``strip_prompts``, ``expand_prompts``) that
  take the prompts and the number of prefix tokens and know nothing about modules;
* ``TokenPrompts``, a mixin for a ``Method`` that records a :class:`TokenSchedule` (which blocks get how
  many tokens, supplied by the method's ``block_prompts``) in its ledger; the model's block loop
  (:mod:`promptvit.layers.block_plan`) inserts, replaces and strips them.

Plus the VPT initialisation: ``U(-v, v)`` with ``v = sqrt(6 / (3 * p_h * p_w + d))``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Collection, Mapping

import torch
from torch import nn

from promptvit.backbones import adapter_for
from promptvit.layers.base import ForwardPlan


def vpt_init_bound(patch_size: int | tuple[int, int], embed_dim: int) -> float:
    """VPT's Xavier-uniform-style bound ``sqrt(6 / (3 * p^2 + d))`` (0.0625 for p=16, d=768)."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    return math.sqrt(6.0 / (3 * ph * pw + embed_dim))


@torch.no_grad()
def init_vpt_uniform_(
    prompts: torch.Tensor, patch_size: int | tuple[int, int], embed_dim: int
) -> torch.Tensor:
    """Fill ``prompts`` in place from ``U(-v, v)`` with VPT's bound; returns it."""
    bound = vpt_init_bound(patch_size, embed_dim)
    return prompts.uniform_(-bound, bound)


class BlockPrompts(nn.Module):
    """Prompt tensors of blocks of different widths (Swin's stages widen): ``self[i]`` is block i's (L, d_i).

    Parameters, or buffers when the prompts stay fixed (saved with the model either way), named ``0, 1, ...``.
    """

    def __init__(self, tensors: list[torch.Tensor], *, trainable: bool = True) -> None:
        super().__init__()
        self.count = len(tensors)
        for index, tensor in enumerate(tensors):
            if trainable:
                self.register_parameter(str(index), nn.Parameter(tensor))
            else:
                self.register_buffer(str(index), tensor)

    def __getitem__(self, index: int) -> torch.Tensor:
        return getattr(self, str(index))

    def __len__(self) -> int:
        return self.count


def expand_prompts(prompts: torch.Tensor, batch: int, dropout: nn.Module | None = None) -> torch.Tensor:
    """(L, d) prompts -> (batch, L, d); dropout (if any) acts on the expanded tensor, as in VPT."""
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0).expand(batch, -1, -1)
    elif prompts.dim() != 3 or prompts.shape[0] not in (1, batch):
        raise ValueError(f"prompts must be (L, d) or (batch, L, d), got {tuple(prompts.shape)}")
    else:
        prompts = prompts.expand(batch, -1, -1)
    return dropout(prompts) if dropout is not None else prompts


def replace_prompts(
    x: torch.Tensor, prompts: torch.Tensor, num_prefix_tokens: int, num_old: int
) -> torch.Tensor:
    """``[prefix, old(num_old), rest]`` -> ``[prefix, prompts, rest]``.

    ``prompts`` is (L, d) or (B, L, d); L may differ from ``num_old`` (0 inserts, L = 0 only drops).
    """
    if x.dim() != 3:
        raise ValueError(f"expected a (batch, tokens, dim) token sequence, got shape {tuple(x.shape)}")
    if x.shape[1] < num_prefix_tokens + num_old:
        raise ValueError(
            f"the sequence has {x.shape[1]} tokens, fewer than {num_prefix_tokens} prefix + {num_old} prompt "
            "tokens: were the prompts inserted before this block?"
        )
    prompts = expand_prompts(prompts, x.shape[0]).to(dtype=x.dtype)
    if prompts.shape[-1] != x.shape[-1]:
        raise ValueError(f"prompts have width {prompts.shape[-1]}, the tokens {x.shape[-1]}")
    return torch.cat([x[:, :num_prefix_tokens], prompts, x[:, num_prefix_tokens + num_old :]], dim=1)


def insert_prompts(x: torch.Tensor, prompts: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """``[prefix, patches]`` -> ``[prefix, prompts, patches]`` (shallow insertion)."""
    return replace_prompts(x, prompts, num_prefix_tokens, 0)


def strip_prompts(x: torch.Tensor, num_prefix_tokens: int, num_prompts: int) -> torch.Tensor:
    """``[prefix, prompts(num_prompts), patches]`` -> ``[prefix, patches]``."""
    if x.shape[1] < num_prefix_tokens + num_prompts:
        raise ValueError(
            f"cannot strip {num_prompts} prompt tokens after {num_prefix_tokens} prefix tokens from a "
            f"sequence of {x.shape[1]}"
        )
    return torch.cat([x[:, :num_prefix_tokens], x[:, num_prefix_tokens + num_prompts :]], dim=1)


@dataclasses.dataclass
class TokenSchedule:
    """Where a method's prompt tokens enter the token stream; the block loop reads it (one per adapter).

    Semantics: the first block of ``inserts`` puts its prompts in after the prefix tokens; every later one
    drops the prompt tokens in the stream (the previous inserting block's outputs) and puts in its own;
    other blocks pass prompt tokens through; the final norm receives the sequence without prompts. A length
    of 0 at a later block only drops the previous prompts.
    """

    num_prefix_tokens: int
    #: block -> (prompt tokens in the stream before it, tokens it puts in)
    inserts: dict[int, tuple[int, int]]
    #: block -> prompt tokens in the stream at its input, for every block from the first inserting one on
    in_block: dict[int, int]
    #: prompt tokens the final norm would see; they are stripped before it
    at_norm: int
    #: blocks whose prompt outputs are discarded next (replaced, or stripped at the norm) and not computed
    skipping: frozenset[int]
    #: ``prompts(block, x)`` -> (batch, L, d): the tokens ``block`` puts in for the input ``x`` it gets
    prompts: Callable[[int, torch.Tensor], torch.Tensor]

    @property
    def layout(self) -> tuple:
        """What fixes the token sequence at every block: samples of equal layouts share one forward."""
        return self.num_prefix_tokens, tuple(sorted(self.inserts.items())), self.at_norm


class TokenPrompts:
    """Mixin for a ``Method`` (an ``nn.Module``) that puts token prompts into a token model.

    The method sets ``num_prefix_tokens`` (usually ``geometry.num_prefix_tokens``), implements
    ``block_prompts(block, x)`` to return the prompts for that block's input (``(L, d)`` or ``(B, L, d)``,
    dropout applied), and calls ``register_token_prompts(backbone, {block: L, ...})`` in ``attach``, which
    records a :class:`TokenSchedule` in its ledger for the block loop. ``without_token_prompts()`` switches
    them off for a prompt-free forward (SPT's data init). A family whose block loop carries prompts beside
    its maps (``adapter.routes_token_prompts``, Swin's windows) gets the same schedule and prompts.
    """

    num_prefix_tokens: int
    plan: ForwardPlan

    def without_token_prompts(self) -> contextlib.AbstractContextManager[ForwardPlan]:
        """Within the block the backbone runs as if no prompts were attached."""
        return self.plan.using(token_prompts=False)

    def keeping_prompt_outputs(self) -> contextlib.AbstractContextManager[ForwardPlan]:
        """Within the block every block outputs its prompt tokens too (same logits, more work)."""
        return self.plan.using(skip_prompt_outputs=False)

    def block_prompts(self, block: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def register_token_prompts(
        self, backbone: nn.Module, lengths: Mapping[int, int], keep_prompt_outputs: Collection[int] = ()
    ) -> None:
        """Record the prompts of ``lengths`` (block -> tokens) for the block loop of ``backbone``.

        ``keep_prompt_outputs`` names blocks that must always compute their prompt outputs (a method that
        reads them there, e.g. through a hook on ``attn.proj``).
        """
        blocks = sorted(lengths)
        if not blocks:
            raise ValueError("no block to prompt")
        adapter = adapter_for(backbone)
        depth = len(adapter.blocks)
        if blocks[0] < 0 or blocks[-1] >= depth:
            raise ValueError(f"prompted blocks {blocks} out of range for a backbone with {depth} blocks")
        self._adapter = [adapter]  # a list: not a submodule
        self._keep_prompt_outputs = frozenset(keep_prompt_outputs)
        #: block -> (prompt tokens in the stream before it, tokens it puts in)
        self.prompt_schedule = {}
        #: block -> prompt tokens in the stream at its input, for every block from the first prompted one
        self.prompts_in_block = {}
        in_stream = 0
        for block in range(blocks[0], depth):
            if block in lengths:
                self.prompt_schedule[block] = (in_stream, int(lengths[block]))
                in_stream = int(lengths[block])
            self.prompts_in_block[block] = in_stream
        #: prompt tokens the final norm would see; they are stripped before it
        self.prompts_at_norm = in_stream
        #: whether the family's block loop carries the prompts beside its maps (Swin's windows)
        self.prompts_routed = adapter.routes_token_prompts
        #: blocks whose prompt outputs are discarded next (replaced, or stripped at the norm) and not computed;
        #: a family whose loop carries the prompts computes them itself, and its final norm reads them
        self.prompt_output_skipping_blocks = frozenset(
            block
            for block, count in self.prompts_in_block.items()
            if count
            and block not in keep_prompt_outputs
            and (
                (self.prompts_routed and block + 1 in lengths)
                or (
                    not self.prompts_routed
                    and (block + 1 in lengths or block == depth - 1)
                    and adapter.supports_selected_rows(block)
                )
            )
        )
        if not self.prompts_routed:  # the family's hooks that give inserted tokens no position
            adapter.prepare_inserted_tokens(self.injections)
        self.injections.insert_tokens(
            TokenSchedule(
                num_prefix_tokens=self.num_prefix_tokens,
                inserts=dict(self.prompt_schedule),
                in_block=dict(self.prompts_in_block),
                at_norm=0 if self.prompts_routed else self.prompts_at_norm,
                skipping=self.prompt_output_skipping_blocks,
                prompts=self.block_prompts,
            )
        )


def reference_device_dtype(backbone: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the backbone's weights, for tensors a method creates in ``attach``."""
    for parameter in backbone.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.get_default_dtype()
