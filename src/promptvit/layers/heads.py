"""Each adapter's own classifier: ``AdapterHeads`` sits in a classifier slot of the backbone.

Like peft's ``modules_to_save``, the backbone's original classifier stays inside as ``base_layer`` and every
adapter has its own copy or new head in ``heads``; a forward uses the head of the adapter its samples are
routed to. A mixed batch needs one head per group of samples (their class counts may differ), so the model
applies heads per adapter (``PromptModel.forward_adapters``) rather than through this layer.
"""

from __future__ import annotations

import torch
from torch import nn

from promptvit.layers.base import AdapterRouting, PerAdapter, TunerLayer


class AdapterHeads(TunerLayer):
    """The classifier slot: one head per adapter in ``heads``, the original classifier as ``base_layer``."""

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting | None = None) -> None:
        super().__init__(base_layer, routing)
        self.heads = PerAdapter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        if routing.per_sample is not None:
            raise RuntimeError(
                "a mixed batch has one head per adapter: take the logits from PromptModel.forward_adapters"
            )
        if routing.active is None or routing.active not in self.heads:
            return self.base_layer(x)
        return self.heads[routing.active](x)
