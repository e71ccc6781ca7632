"""Adapter for timm ``VisionTransformerDistilled`` (DeiT distilled: class and distillation tokens, two heads).

Everything is a ViT's except the readout: two prefix tokens (prompts go after both), and at inference the
logits are the mean of ``head`` (class token) and ``head_dist`` (distillation token), so both are the head.
"""

from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from promptvit.backbones.base import register_adapter
from promptvit.backbones.vit import ViTAdapter


@register_adapter(VisionTransformerDistilled)
class DistilledViTAdapter(ViTAdapter):
    family = "VisionTransformerDistilled"
    tiny_builds = {
        "deit_distilled": (
            "deit_tiny_distilled_patch16_224",
            dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
            16,
        ),
    }

    model: VisionTransformerDistilled

    def classifier_name(self) -> str:
        return "head"

    def classifier_modules(self) -> list[nn.Module]:
        return [self.model.head, self.model.head_dist]

    def classifier_slots(self) -> list[tuple[nn.Module, str]]:
        return [(self.model, "head"), (self.model, "head_dist")]

    def head_input(self, features: torch.Tensor) -> torch.Tensor:
        """The class and distillation tokens after the final norm, (B, 2, D): each has its own head."""
        return features[:, :2]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return (self.model.head(features[:, 0]) + self.model.head_dist(features[:, 1])) / 2

    def reads_class_token_only(self) -> bool:
        return False  # the distillation token's head is read too
