"""VP: an input-independent prompt ADDED to the input, in token space (EPT's baseline) or pixel space (Bahng).

Two modes:

* ``token`` (default, ViT only): the EPT paper's VP baseline, "VP adds values of prompt tokens and embedding
  tokens across all channels". A prompt of shape (num_tokens, d), one row per token position including CLS
  and register tokens, is added to the embedded tokens (after the position embedding) at the input of
  block 0. The sequence length does not change.
* ``pad``: Bahng et al. (2022)'s padding prompt in pixel space: a learnable frame of width ``pad_size``
  around the (normalised) input image, added to the pixels before the patch embedding (ViT) or the stem
  (CNN); the centre is not touched. Parameters ``2*3*pad*W + 2*3*pad*(H - 2*pad)``.

Initialisation: ``zeros`` by default, so the wrapped model starts exactly as the backbone (and
``identity_at_init`` holds); the additive prompt still gets gradients from the first step. ``normal`` draws
from N(0, init_std^2) (Bahng's code uses N(0, 1) for the pixel frame: ``init_std=1.0``).

The EPT appendix also mentions a "prompt length" and "DEEP" layers for its VP baseline without defining
them; this module implements the definition from its method section (one additive prompt at the input).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from promptvit.backbones import Geometry
from promptvit.layers.token_prompts import reference_device_dtype
from promptvit.methods.base import ConfigError, Method, MethodConfig, register_method


@dataclasses.dataclass
class VPConfig(MethodConfig):
    mode: Literal["token", "pad"] = "token"
    init: Literal["zeros", "normal"] = "zeros"
    init_std: float = 0.02  # for init="normal"
    pad_size: int = 30  # width of the pixel frame (mode="pad")
    # (H, W) of the images a CNN receives, which the pixel frame is sized for; default the model's
    # pretrained_cfg input size. ViTs always use their own img_size.
    cnn_input_size: list[int] | None = None

    def validate(self) -> None:
        if self.mode not in ("token", "pad"):
            raise ConfigError(f"vp: mode must be 'token' or 'pad', got {self.mode!r}")
        if self.init not in ("zeros", "normal"):
            raise ConfigError(f"vp: init must be 'zeros' or 'normal', got {self.init!r}")
        if self.init_std < 0:
            raise ConfigError(f"vp: init_std must be >= 0, got {self.init_std}")
        if self.pad_size < 1:
            raise ConfigError(f"vp: pad_size must be >= 1, got {self.pad_size}")
        _check_input_size("vp", self.cnn_input_size)


def _check_input_size(method: str, size: list[int] | None) -> None:
    if size is not None and (len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size)):
        raise ConfigError(f"{method}: cnn_input_size must be two positive ints [H, W], got {size!r}")


def image_size(geometry: Geometry, cnn_input_size: list[int] | None) -> tuple[int, int]:
    """Input (H, W) a prompt is sized for: a ViT's img_size, or a CNN's configured/overridden input size."""
    if geometry.kind == "cnn" and cnn_input_size is not None:
        return int(cnn_input_size[0]), int(cnn_input_size[1])
    return int(geometry.img_size[0]), int(geometry.img_size[1])


@register_method
class VP(Method):
    """Visual prompting by addition: ``prompt`` (token mode) or ``pad_up/pad_down/pad_left/pad_right`` (pad)."""

    name = "vp"
    table_rank = 8
    config_class = VPConfig
    paper = "VP (Bahng et al. 2022), as the EPT paper's baseline"
    # Token mode needs a ViT (ConfigError on a CNN); pad mode works on both.
    supported_kinds = ("vit", "cnn")
    identity_at_init = True  # default zero init
    # The matrix exercises pad mode, the one that runs on every backbone kind; tests/methods/test_vp.py
    # covers token mode.
    test_options = {"mode": "pad", "pad_size": 2, "cnn_input_size": [32, 32]}

    config: VPConfig

    def __init__(self, config: VPConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        if config.mode == "token" and geometry.kind != "vit":
            raise ConfigError(
                f"vp: mode='token' adds a prompt to ViT tokens; {geometry.architecture} is a CNN: use mode='pad'"
            )
        if config.mode == "pad":
            height, width = image_size(geometry, config.cnn_input_size)
            if 2 * config.pad_size >= min(height, width):
                raise ConfigError(
                    f"vp: pad_size={config.pad_size} leaves no image inside the frame of a {height}x{width} "
                    f"input; it must be < {(min(height, width) + 1) // 2}"
                )

    def _new(self, *shape: int, device: torch.device, dtype: torch.dtype) -> nn.Parameter:
        tensor = torch.zeros(*shape, device=device, dtype=dtype)
        if self.config.init == "normal":
            nn.init.normal_(tensor, std=self.config.init_std)
        return nn.Parameter(tensor)

    def attach(self, backbone: nn.Module) -> None:
        device, dtype = reference_device_dtype(backbone)
        if self.config.mode == "token":
            self.prompt = self._new(
                self.geometry.num_tokens, self.geometry.embed_dim, device=device, dtype=dtype
            )
            self.injections.change_block_input(0, self._add_token_prompt)
            return
        height, width = image_size(self.geometry, self.config.cnn_input_size)
        pad = self.config.pad_size
        self.pad_up = self._new(3, pad, width, device=device, dtype=dtype)
        self.pad_down = self._new(3, pad, width, device=device, dtype=dtype)
        self.pad_left = self._new(3, height - 2 * pad, pad, device=device, dtype=dtype)
        self.pad_right = self._new(3, height - 2 * pad, pad, device=device, dtype=dtype)
        self.injections.change_images(self._add_pad_prompt)

    def frame(self) -> torch.Tensor:
        """The (3, H, W) pixel prompt: the learned border around a zero centre."""
        pad = self.config.pad_size
        height = self.pad_left.shape[1]
        width = self.pad_up.shape[2]
        centre = self.pad_up.new_zeros(3, height, width - 2 * pad)
        middle = torch.cat([self.pad_left, centre, self.pad_right], dim=2)
        return torch.cat([self.pad_up, middle, self.pad_down], dim=1)

    def _add_token_prompt(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != self.prompt.shape:
            raise ValueError(
                f"vp: the token prompt has {self.prompt.shape[0]} rows for {self.geometry.img_size[0]}x"
                f"{self.geometry.img_size[1]} inputs, but block 0 got {x.shape[1]} tokens of width {x.shape[2]}; "
                f"feed {self.geometry.img_size[0]}x{self.geometry.img_size[1]} images"
            )
        return x + self.prompt

    def _add_pad_prompt(self, x: torch.Tensor) -> torch.Tensor:
        frame = self.frame()
        if x.shape[1:] != frame.shape:
            raise ValueError(
                f"vp: the pad prompt is sized for {frame.shape[1]}x{frame.shape[2]} RGB images, got input of shape "
                f"{tuple(x.shape[1:])}; resize the images or set cnn_input_size (CNNs)"
            )
        return x + frame

    def tuned_from_block(self) -> int:
        """No frozen prefix worth caching: the prompt is added at the input (pixels or block-0 tokens)."""
        return 0

    @classmethod
    def expected_num_parameters(cls, config: VPConfig, geometry: Geometry) -> int | None:
        if config.mode == "token":
            return geometry.num_tokens * geometry.embed_dim
        height, width = image_size(geometry, config.cnn_input_size)
        pad = config.pad_size
        return 2 * 3 * pad * width + 2 * 3 * pad * (height - 2 * pad)
