"""LoRA on chosen output parts of a fused linear layer (timm's ``qkv`` projection: query, key, value).

For a frozen ``nn.Linear`` whose output concatenates ``num_parts`` equal parts ``y = [y_0, ..., y_{n-1}]``,
each targeted part ``p`` gets its own low-rank update (Hu et al., ICLR 2022)::

    y_p = W_p x + b_p + (alpha / rank) * B_p A_p dropout(x)

with ``A_p`` (rank x in_features) Kaiming-uniform with ``a = sqrt(5)`` (peft's default) and ``B_p``
(part_size x rank) zero, so the layer computes exactly the frozen linear at initialisation. Parts that are
not targeted pass through unchanged. The unmerged forward never builds the full weight update: it projects
``x`` to ``len(parts) * rank`` features once and adds them back through one block-structured B in a fused
``addmm``.

Two layouts of timm's fused projections are covered besides the plain ``[q | k | v]`` linear: a 1x1
convolution on (B, C, H, W) maps (CoAtNet's ``Attention2d``), the same linear map applied at every position,
and the ``head_first`` layout (MaxViT, CoAtNet), whose output holds the heads one after another, each
``[q | k | v]`` of width ``head_dim``: part ``p`` is then the rows ``p`` of every head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from promptvit.layers.base import TunerLayer


class FusedLoRALinear(TunerLayer):
    """A frozen fused ``nn.Linear`` or 1x1 ``nn.Conv2d`` (kept as ``base_layer``) plus LoRA updates on some of
    its output parts.

    Parameters: ``lora_A`` of shape (len(parts), rank, in_features) and ``lora_B`` of shape
    (len(parts), part_size, rank); row ``i`` of both belongs to part ``parts[i]`` (``parts`` is sorted).
    ``heads`` > 0 says the output is laid out head by head, each head ``[part_0 | part_1 | ...]``.

    ``merge()`` adds the update into ``base_layer.weight`` and the forward then skips the low-rank path;
    ``unmerge()`` puts the frozen weight back. Both are idempotent (merging a merged layer does nothing). A/B are
    never changed by merging, so saving them while merged stores the same (unmerged) factors.
    """

    def __init__(
        self,
        base_layer: nn.Linear | nn.Conv2d,
        parts: Sequence[int],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        num_parts: int = 3,
        heads: int = 0,
    ) -> None:
        super().__init__()
        self.conv = isinstance(base_layer, nn.Conv2d)
        if self.conv and (base_layer.kernel_size != (1, 1) or base_layer.groups != 1):
            raise ValueError("only a 1x1 convolution without groups is a linear map of the channels")
        out_features, in_features = base_layer.weight.shape[:2]
        if out_features % (num_parts * max(heads, 1)):
            raise ValueError(
                f"out_features {out_features} is not divisible into {num_parts} parts"
                + (f" of {heads} heads" if heads else "")
            )
        parts = sorted(parts)
        if not parts or len(set(parts)) != len(parts) or not all(0 <= p < num_parts for p in parts):
            raise ValueError(f"parts must be distinct indices in [0, {num_parts}), got {list(parts)}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base_layer = base_layer
        self.parts = tuple(parts)
        self.num_parts = num_parts
        self.heads = heads
        self.part_size = out_features // num_parts
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.merged = False
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(len(parts), rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(len(parts), self.part_size, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform(a=sqrt(5)) per part (fan-in = in_features); B: zeros."""
        with torch.no_grad():
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update of each targeted part's weight rows, (len(parts), part_size, in_features)."""
        return torch.matmul(self.lora_B, self.lora_A) * self.scaling

    def stacked_lora_B(self) -> torch.Tensor:
        """All parts' B as one (out_features, len(parts) * rank) matrix, rows in the output's order: block
        ``(p, i)`` is ``B_i`` if part ``p`` is ``parts[i]``, zero elsewhere, so one matmul applies every part's
        update to its own rows."""
        n, rank = len(self.parts), self.rank
        rows = []
        for p in range(self.num_parts):
            if p in self.parts:
                i = self.parts.index(p)
                rows.append(F.pad(self.lora_B[i], (i * rank, (n - 1 - i) * rank)))
            else:
                rows.append(self.lora_B.new_zeros(self.part_size, n * rank))
        stacked = torch.cat(rows)
        if self.heads:  # part-major rows -> head-major rows
            stacked = stacked.view(self.num_parts, self.heads, -1, n * rank).transpose(0, 1).reshape(-1, n * rank)
        return stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    "this LoRA layer is merged into its base weights; unmerge() before training"
                )
            return y
        n = len(self.parts)
        if self.conv:  # the same maps at every position of the (B, C, H, W) input
            h = F.conv2d(self.lora_dropout(x), self.lora_A.reshape(n * self.rank, -1, 1, 1))
            return y + self.scaling * F.conv2d(h, self.stacked_lora_B()[:, :, None, None])
        # (..., n * rank): one projection for all targeted parts.
        h = F.linear(self.lora_dropout(x), self.lora_A.reshape(n * self.rank, -1))
        # y + scaling * h @ B^T in one fused addmm (a few zero blocks cost less than per-part products).
        update = torch.addmm(
            y.reshape(-1, y.shape[-1]),
            h.reshape(-1, h.shape[-1]),
            self.stacked_lora_B().T,
            alpha=self.scaling,
        )
        return update.reshape(y.shape)

    @torch.no_grad()
    def _add_delta(self) -> None:
        weight = self.base_layer.weight
        delta = self.delta_weight().to(weight.dtype)
        if self.heads:  # (heads, parts, head_dim, in): part p of every head
            rows = weight.view(self.heads, self.num_parts, -1, delta.shape[-1])
            for i, p in enumerate(self.parts):
                rows[:, p].add_(delta[i].view(self.heads, -1, delta.shape[-1]))
            return
        rows = weight.view(self.num_parts, self.part_size, -1)
        for i, p in enumerate(self.parts):
            rows[p].add_(delta[i])

    def merge(self) -> None:
        """Fold the update into the frozen weight; a no-op when already merged.

        The frozen weight is kept aside while merged, so ``unmerge`` gives it back bit for bit.
        """
        if not self.merged:
            self._unmerged_weight = self.base_layer.weight.detach().clone()
            self._add_delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the frozen weight back as it was before ``merge``; a no-op when not merged."""
        if self.merged:
            self.base_layer.weight.copy_(self._unmerged_weight)
            del self._unmerged_weight
            self.merged = False

    def extra_repr(self) -> str:
        heads = f", heads={self.heads}" if self.heads else ""
        return f"parts={self.parts}{heads}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"
