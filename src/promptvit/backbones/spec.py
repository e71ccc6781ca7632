"""``BackboneSpec``: which backbone a run builds (a timm name, local weights, build options, input statistics),
and the backbone it names.

The ``backbone`` section of a run config. :func:`build_backbone` creates it (``create_backbone``) and refuses
a patch that does not tile the image; :func:`backbone_init` is what every run records of where the weights
came from.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import BaseModel, Field, field_validator

from promptvit.backbones import create_backbone, geometry_of
from promptvit.errors import ConfigError
from promptvit.validation import FINITE, whole_number

logger = logging.getLogger(__name__)

#: timm build options that are counts or sizes (checked when they are given: >= 1, whole numbers)
SIZE_OPTIONS = ("depth", "img_size", "patch_size", "embed_dim", "num_heads", "num_classes")


class BackboneSpec(BaseModel):
    """Which backbone: a timm name (``arch.tag``), optionally with local weights and build options."""

    model_config = FINITE

    name: str = Field(description="timm model name, e.g. vit_base_patch16_224.orig_in21k")
    pretrained: bool = Field(False, description="download pretrained weights from the Hugging Face hub")
    weights: str | None = Field(
        None, description="local weights file (.safetensors or .pth) instead of the hub"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="timm build options (img_size, depth...)"
    )
    allow_pickle: bool = Field(
        False, description="trust a .pth weights file holding arbitrary pickled objects"
    )
    mean: list[float] | None = Field(
        None, description="input normalisation mean (default: the model's config)"
    )
    std: list[float] | None = Field(None, description="input normalisation std (default: the model's config)")
    image_size: int | None = Field(
        None, ge=8, description="CNN input size (ViTs are fed the img_size they were built for)"
    )

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, value: list[float] | None, info: Any) -> list[float] | None:
        if value is not None and (len(value) != 3 or (info.field_name == "std" and min(value) <= 0)):
            raise ValueError(f"give 3 values, one per RGB channel{', all > 0' if info.field_name == 'std' else ''}")
        return value

    @field_validator("options")
    @classmethod
    def _build_sizes(cls, options: dict[str, Any]) -> dict[str, Any]:
        for name in SIZE_OPTIONS:
            value = options.get(name)
            sizes = value if isinstance(value, (list, tuple)) and name in ("img_size", "patch_size") else [value]
            if value is not None and not all(whole_number(v) and v >= 1 for v in sizes):
                raise ValueError(f"backbone.{name} must be a whole number >= 1, got {value!r}")
        return options


def check_patch_grid(backbone: torch.nn.Module) -> None:
    """A ViT's patch must fit its image a whole number of times (``ConfigError`` naming both sizes).

    A patch larger than the image leaves no tokens; an image that is not a multiple of the patch would have
    its last rows and columns silently dropped.
    """
    geometry = geometry_of(backbone)
    if geometry.kind != "vit" or geometry.dynamic_img_size:
        return
    for image, patch in zip(geometry.img_size, geometry.patch_size, strict=True):
        if patch > image or image % patch:
            fits = max(patch, image // patch * patch)
            raise ConfigError(
                f"backbone.patch_size {patch} does not tile backbone.img_size {image}: the image must be a "
                f"multiple of the patch (e.g. --backbone.img-size {fits}, or a smaller --backbone.patch-size)"
            )


def build_backbone(spec: BackboneSpec) -> torch.nn.Module:
    """The timm model ``spec`` names (hub or local weights, build options), its patch grid checked."""
    backbone = create_backbone(
        spec.name,
        pretrained=spec.pretrained,
        weights=spec.weights,
        allow_pickle=spec.allow_pickle,
        **spec.options,
    )
    check_patch_grid(backbone)
    return backbone


def backbone_init(spec: BackboneSpec) -> str:
    """``pretrained`` (hub), ``weights`` (a local file) or ``random``: recorded with every run."""
    return "weights" if spec.weights else "pretrained" if spec.pretrained else "random"


def warn_if_random_init(spec: BackboneSpec) -> None:
    if backbone_init(spec) == "random":
        logger.warning(
            "the backbone '%s' is randomly initialised (no --pretrained or --weights): results will say "
            "little about a pretrained model; this run is marked backbone_init: random",
            spec.name,
        )
