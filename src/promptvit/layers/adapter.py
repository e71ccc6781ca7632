"""AdaptFormer's parallel bottleneck adapter around a frozen transformer MLP (Chen et al., NeurIPS 2022).

The paper's block is::

    x' = x + MHSA(LN(x))
    x'' = x' + MLP(LN(x')) + s * up(ReLU(down(LN(x'))))

so the adapter runs in parallel with the MLP on the same normalised hidden state, and its output is scaled
by a fixed ``s`` and added. ``ParallelAdapterMlp`` replaces a block's ``mlp``, so its input is exactly what
the MLP receives (after ``norm2``), i.e. ``LN(x')`` as in the paper's equation (the authors' released
code can instead feed the un-normalised residual stream; we follow the paper). Wrapping the MLP also means
that a block's ``ls2``/``drop_path2`` (identity in plain ViTs at inference) act on the sum.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from promptvit.layers.base import AdapterRouting, PerAdapter, TunerLayer


class Bottleneck(nn.Module):
    """``up(dropout(ReLU(down(x))))``; down Kaiming-uniform(a=sqrt(5)), up and both biases zero; ``scale`` is
    the fixed ``s`` its output is added with."""

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        dropout: float = 0.0,
        scale: float = 0.1,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.scale = scale  # s, fixed: the output is added as ``s * up(...)``
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


class ParallelAdapterMlp(TunerLayer):
    """A frozen MLP (kept as ``base_layer``) plus each adapter's scaled parallel bottleneck (``adapter``):
    ``mlp(x) + s * bottleneck(x)`` on that adapter's rows.

    An MLP of 1x1 convolutions (timm's ``ConvMlp``: CoAtNet, MaxViT's NCHW blocks) reads (B, C, H, W) maps; the
    bottleneck then acts on the channels at every position.
    """

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting | None = None) -> None:
        super().__init__(base_layer, routing)
        self.adapter = PerAdapter(artifact_name="adapter")
        self.channels_first = isinstance(getattr(base_layer, "fc1", None), nn.Conv2d)

    def add_adapter(
        self, name: str, dim: int, bottleneck: int, scale: float = 0.1, dropout: float = 0.0
    ) -> Bottleneck:
        reference = next(self.base_layer.parameters(), None)
        factory = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
        self.adapter[name] = Bottleneck(dim, bottleneck, dropout, scale=scale, **factory)
        return self.adapter[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for name, rows in self.routing.groups(self.adapter, x.shape[0]):
            bottleneck = self.adapter[name]
            inputs = x if rows is None else x[rows]
            if self.channels_first:
                update = bottleneck.scale * bottleneck(inputs.movedim(1, -1)).movedim(-1, 1)
            else:
                update = bottleneck.scale * bottleneck(inputs)
            y = y + update if rows is None else y.index_add(0, rows, update)
        return y
