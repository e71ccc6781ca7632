"""AP: an input-independent prompt on the activation map at the input of one block (ViT) or stage (CNN).

No official code exists (docs/methods.md, AP); this is our reading of the paper, which defines
``g(z, delta) = z + delta`` at layer l, with VP as the case l = 0:

* ``add`` (the paper's AP): ``z_l + delta``, delta of the full activation shape, shared across samples and
  zero-initialised, so the wrapped model starts as the backbone. ViT: (num_tokens, d), CLS row included
  (197 x 768 at ViT-B/16, 224 px). CNN: (C, H, W) of the stage's input.
* ``product`` (AP-Product, Tab. A6): ``z_l * (1 + delta)``, delta zero-initialised (identity at init).
* ``concat`` (AP-Concate, Tab. A6; ViT only): ``prompt_length`` VPT-style tokens inserted after the prefix
  tokens at block ``layer`` only, VPT's uniform init, removed before the final norm. Not identity at init.

``layer`` is the ViT block index, or the CNN stage index in ``promptvit.backbones.cnn_stages`` (ResNet
``layer1..4`` -> 0..3, EfficientNet ``blocks[0..6]``). By default (``layer=None``) it is where the paper's
experiments put AP (Sec. 5 and App. A): the third block of a ViT (index 2; the last block of a ViT with
fewer), and for a CNN the input of its last stage, which for ResNet-50/101/152 (three residual blocks in
``layer4``) is exactly the paper's "input of the third-to-last ResNet block". Our stage granularity cannot
name a block inside a stage, so other CNNs get the last stage as the nearest reading.

CNN activation shapes depend on the input size. The prompt is sized, with one probing forward of a zero
image (stopped at the stage), for ``cnn_input_size`` if given, else the backbone's ``pretrained_cfg``
input size (which ``create_backbone(..., pretrained_cfg_overlay=dict(input_size=(3, H, W)))`` also sets).
Inputs of another size then fail with an error naming the expected size.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from promptvit.backbones import BackboneError, Geometry, adapter_for
from promptvit.layers.token_prompts import (
    TokenPrompts,
    expand_prompts,
    init_vpt_uniform_,
    reference_device_dtype,
)
from promptvit.methods.base import ConfigError, Method, MethodConfig, register_method
from promptvit.methods.partial import NO_STAGES
from promptvit.methods.vp import _check_input_size, image_size


@dataclasses.dataclass
class APConfig(MethodConfig):
    layer: int | None = None  # ViT block / CNN stage whose input is prompted; None: the paper's default
    variant: Literal["add", "product", "concat"] = "add"
    prompt_length: int = 10  # tokens of the concat variant
    # (H, W) of the images a CNN receives, which the activation prompt is sized for; default the model's
    # pretrained_cfg input size. ViTs always use their own img_size.
    cnn_input_size: list[int] | None = None

    def validate(self) -> None:
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"ap: layer must be >= 0, got {self.layer}")
        if self.variant not in ("add", "product", "concat"):
            raise ConfigError(f"ap: variant must be 'add', 'product' or 'concat', got {self.variant!r}")
        if self.prompt_length < 1:
            raise ConfigError(f"ap: prompt_length must be >= 1, got {self.prompt_length}")
        _check_input_size("ap", self.cnn_input_size)


def paper_default_layer(geometry: Geometry) -> int:
    """The AP paper's location: ViT block 2 (the third), or a CNN's last stage (see the module docstring)."""
    if geometry.kind == "vit":
        return min(2, geometry.depth - 1)
    return max(geometry.depth - 1, 0)


@register_method
class AP(TokenPrompts, Method):
    """Activation prompt: ``delta`` (add, product) or ``prompts`` (concat) at the input of one block/stage."""

    name = "ap"
    table_rank = 11
    config_class = APConfig
    paper = "AP: Activation Prompts (Zhang et al., AISTATS 2026)"
    supported_kinds = ("vit", "cnn")
    identity_at_init = True  # the default additive variant, zero-initialised
    test_options = {"cnn_input_size": [32, 32]}  # the tiny ResNet of the test matrix sees 32 px images

    config: APConfig

    def __init__(self, config: APConfig, geometry: Geometry) -> None:
        if config.layer is None:
            config = dataclasses.replace(config, layer=paper_default_layer(geometry))
        super().__init__(config, geometry)
        unit = "blocks" if geometry.kind == "vit" else "stages"
        if config.layer >= geometry.depth:
            raise ConfigError(
                f"ap: layer={config.layer} out of range for {geometry.architecture} with {geometry.depth} {unit}"
                + (NO_STAGES if geometry.depth == 0 else "")
            )
        if config.variant == "concat" and geometry.kind != "vit":
            raise ConfigError(
                "ap: variant='concat' inserts tokens and needs a ViT; use 'add' or 'product' on CNNs"
            )
        self.num_prefix_tokens = geometry.num_prefix_tokens

    def attach(self, backbone: nn.Module) -> None:
        device, dtype = reference_device_dtype(backbone)
        if self.config.variant == "concat":
            prompts = torch.empty(
                self.config.prompt_length, self.geometry.embed_dim, device=device, dtype=dtype
            )
            self.prompts = nn.Parameter(
                init_vpt_uniform_(prompts, self.geometry.patch_size, self.geometry.embed_dim)
            )
            self.register_token_prompts(backbone, {self.config.layer: self.config.prompt_length})
            return
        if self.geometry.kind == "vit":
            shape = (self.geometry.num_tokens, self.geometry.embed_dim)
        else:
            shape = self._probe_stage_input(backbone, device, dtype)
        self.delta = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        if self.geometry.kind == "vit":  # blocks run in the model's block loop
            self.injections.change_block_input(self.config.layer, self._prompt_activation)
        else:  # stages run inside timm's forward: a pre-hook on the stage
            stage = adapter_for(backbone).stages[self.config.layer]
            self.injections.pre_hook(stage, self._prompt_stage_input)

    def _probe_stage_input(
        self, backbone: nn.Module, device: torch.device, dtype: torch.dtype
    ) -> tuple[int, ...]:
        """(C, H, W) of the prompted stage's input for one zero image of the configured size."""
        try:
            return adapter_for(backbone).stage_input_shape(
                image_size(self.geometry, self.config.cnn_input_size), self.config.layer
            )
        except BackboneError as error:
            raise ConfigError(f"ap: {error}") from None

    def _prompt_activation(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1:] != self.delta.shape:
            raise ValueError(self._shape_error(tuple(z.shape[1:])))
        return z + self.delta if self.config.variant == "add" else z * (1 + self.delta)

    def _prompt_stage_input(self, module: nn.Module, args: tuple) -> tuple:
        return (self.on_own_rows(args[0], self._prompt_activation), *args[1:])

    def _shape_error(self, got: tuple[int, ...]) -> str:
        height, width = image_size(self.geometry, self.config.cnn_input_size)
        where = f"block {self.config.layer}" if self.geometry.kind == "vit" else f"stage {self.config.layer}"
        hint = "" if self.geometry.kind == "vit" else " (or build the method with cnn_input_size=[H, W])"
        return (
            f"ap: the activation prompt at {where} has shape {tuple(self.delta.shape)}, sized for "
            f"{height}x{width} input images, but the activation there has shape {got}; "
            f"feed {height}x{width} images{hint}"
        )

    def block_prompts(self, block: int, x: torch.Tensor) -> torch.Tensor:
        return expand_prompts(self.prompts, x.shape[0])

    def tuned_from_block(self) -> int:
        """The prompt changes the input of block ``layer`` (ViT); CNN stages are not cached (0)."""
        return self.config.layer if self.geometry.kind == "vit" else 0

    @classmethod
    def expected_num_parameters(cls, config: APConfig, geometry: Geometry) -> int | None:
        if config.variant == "concat":
            return config.prompt_length * geometry.embed_dim
        if geometry.kind == "vit":
            return geometry.num_tokens * geometry.embed_dim
        return None  # C x H x W of a CNN stage input depends on the architecture's channels and strides
