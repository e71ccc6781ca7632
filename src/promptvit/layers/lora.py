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

Several adapters share one :class:`FusedLoRALinear` per projection, each with its own :class:`LoRAFactors`;
a forward applies each adapter present in the batch to its own rows (peft's ``_mixed_batch_forward``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from promptvit.layers.base import AdapterRouting, PerAdapter, TunerLayer


class LoRAFactors(nn.Module):
    """One adapter's update of a fused linear layer.

    Parameters: ``lora_A`` of shape (len(parts), rank, in_features) and ``lora_B`` of shape
    (len(parts), part_size, rank); row ``i`` of both belongs to part ``parts[i]`` (``parts`` is sorted).
    The layout of the projection it updates: ``heads`` > 0 when its output holds the heads one after another,
    each ``[part_0 | part_1 | ...]``; ``conv`` when it is a 1x1 convolution on (B, C, H, W) maps.
    """

    def __init__(
        self,
        in_features: int,
        part_size: int,
        parts: Sequence[int],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        num_parts: int = 3,
        *,
        heads: int = 0,
        conv: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        parts = sorted(parts)
        if not parts or len(set(parts)) != len(parts) or not all(0 <= p < num_parts for p in parts):
            raise ValueError(f"parts must be distinct indices in [0, {num_parts}), got {list(parts)}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.parts = tuple(parts)
        self.num_parts = num_parts
        self.part_size = part_size
        self.heads = heads
        self.conv = conv
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.merged = False
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(len(parts), rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(len(parts), part_size, rank, **factory))
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
        """All parts' B as one (out_features, len(parts) * rank) matrix: block ``(p, i)`` is ``B_i`` if part
        ``p`` is ``parts[i]``, zero elsewhere, so one matmul applies every part's update to its own rows."""
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

    def add_update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + scaling * B A dropout(x)``, with ``y`` the frozen layer's output for ``x``."""
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

    def extra_repr(self) -> str:
        heads = f", heads={self.heads}" if self.heads else ""
        return f"parts={self.parts}{heads}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


class FusedLoRALinear(TunerLayer):
    """A frozen fused ``nn.Linear`` or 1x1 ``nn.Conv2d`` (kept as ``base_layer``) plus each adapter's LoRA
    update (``lora``). ``heads`` > 0 says the output is laid out head by head, each head ``[q | k | v]``.

    ``merge(name)`` adds an adapter's update into ``base_layer.weight`` and the forward then skips its
    low-rank path; ``unmerge(name)`` puts the frozen weight back. Both are idempotent. The factors are never
    changed by merging, so saving them while merged stores the same (unmerged) factors.
    """

    def __init__(
        self,
        base_layer: nn.Linear | nn.Conv2d,
        routing: AdapterRouting | None = None,
        num_parts: int = 3,
        heads: int = 0,
    ) -> None:
        super().__init__(base_layer, routing)
        self.conv = isinstance(base_layer, nn.Conv2d)
        if self.conv and (base_layer.kernel_size != (1, 1) or base_layer.groups != 1):
            raise ValueError("only a 1x1 convolution without groups is a linear map of the channels")
        if not self.conv and not isinstance(base_layer, nn.Linear):
            raise ValueError(f"{type(base_layer).__name__} is neither an nn.Linear nor a 1x1 nn.Conv2d")
        out_features, self.in_features = base_layer.weight.shape[:2]
        if out_features % (num_parts * max(heads, 1)):
            raise ValueError(
                f"out_features {out_features} is not divisible into {num_parts} parts"
                + (f" of {heads} heads" if heads else "")
            )
        self.num_parts = num_parts
        self.heads = heads
        self.part_size = out_features // num_parts
        self.lora = PerAdapter()

    def add_adapter(
        self, name: str, parts: Sequence[int], rank: int, alpha: float, dropout: float = 0.0
    ) -> LoRAFactors:
        weight = self.base_layer.weight
        factors = LoRAFactors(
            self.in_features,
            self.part_size,
            parts,
            rank,
            alpha,
            dropout,
            self.num_parts,
            heads=self.heads,
            conv=self.conv,
            device=weight.device,
            dtype=weight.dtype,
        )
        self.lora[name] = factors
        return factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for name, rows in self.routing.groups(self.lora, x.shape[0]):
            factors = self.lora[name]
            if (
                factors.merged
            ):  # the update is in base_layer.weight (only while its adapter is the active one)
                if self.training and torch.is_grad_enabled():
                    raise RuntimeError(
                        "this LoRA layer is merged into its base weights; unmerge() before training"
                    )
                continue
            if rows is None:
                y = factors.add_update(x, y)
            else:
                y = y.index_copy(0, rows, factors.add_update(x[rows], y[rows]))
        return y

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name``'s update into the frozen weight; a no-op when already merged.

        The frozen weight is kept aside while merged, so ``unmerge`` gives it back bit for bit.
        """
        factors = self.lora[name]
        if factors.merged:
            return
        weight = self.base_layer.weight
        self._unmerged_weight = weight.detach().clone()
        delta = factors.delta_weight().to(weight.dtype)
        if self.heads:  # (heads, parts, head_dim, in): part p of every head
            rows = weight.view(self.heads, self.num_parts, -1, self.in_features)
            for i, p in enumerate(factors.parts):
                rows[:, p].add_(delta[i].view(self.heads, -1, self.in_features))
        else:
            rows = weight.view(self.num_parts, self.part_size, -1)
            for i, p in enumerate(factors.parts):
                rows[p].add_(delta[i])
        factors.merged = True

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Put the frozen weight back as it was before ``merge``; a no-op when not merged."""
        factors = self.lora[name]
        if factors.merged:
            self.base_layer.weight.copy_(self._unmerged_weight)
            del self._unmerged_weight
            factors.merged = False
