"""Train/eval preprocessing built from a timm ``data_config``.

Medical images arrive as 8- and 16-bit greyscale, palette, CMYK or RGBA files, while pretrained
backbones expect 8-bit RGB normalised with their own mean/std. :class:`ToModelMode` bridges the
first gap, :func:`build_transforms` the second, so every backbone sees inputs prepared the way it
was pretrained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from promptvit.data.errors import DataError

_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
    "hamming": InterpolationMode.HAMMING,
    "box": InterpolationMode.BOX,
    "random": InterpolationMode.BILINEAR,  # timm's train-time 'random' choice; bilinear is its default
}

_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def to_8bit(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit 'L' or 'RGB' (alpha is composited onto black).

    16/32-bit and float images are scaled by their maximum so that the brightest pixel becomes
    255: medical 16-bit files often use only 10-12 bits, and a plain cast would clip or darken them.
    Black is the background of almost every medical modality, so transparency becomes black.
    """
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in _HIGH_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        pixels = np.clip(np.where(np.isfinite(pixels), pixels, 0.0), 0.0, None)  # inf would darken the rest
        peak = pixels.max()
        scaled = pixels * (255.0 / peak) if peak > 0 else pixels
        return Image.fromarray(np.round(scaled).astype(np.uint8))
    if mode == "1":
        return image.convert("L")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ToModelMode:
    """Transform step: any PIL image -> 8-bit RGB (or 'L' for one-channel models).

    A class rather than a lambda so the pipeline pickles into DataLoader worker processes.
    """

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise DataError(f"models with {channels} input channels are not supported (only 1 or 3)")
        self.channels = channels

    def __call__(self, image: Image.Image) -> Image.Image:
        image = to_8bit(image)
        target = "L" if self.channels == 1 else "RGB"
        return image if image.mode == target else image.convert(target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels})"


def _size_tuple(size: int | Sequence[int]) -> tuple[int, int, int | None]:
    """(height, width, channels or None) from an int, (H, W) or timm's (C, H, W)."""
    if isinstance(size, int):
        return size, size, None
    values = tuple(int(v) for v in size)
    if len(values) == 2:
        return values[0], values[1], None
    if len(values) == 3:
        return values[1], values[2], values[0]
    raise DataError(f"input_size must be an int, (H, W) or (C, H, W), got {size!r}")


def build_transforms(
    data_config: Mapping[str, Any],
    train: bool,
    *,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    train_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
) -> Callable[[Image.Image], torch.Tensor]:
    """Preprocessing for ``timm.data.resolve_data_config({}, model=model)``.

    Train: RandomResizedCrop (area ``train_scale``) + horizontal flip (unless ``hflip=False``, e.g. for
    digits or laterality-sensitive images); eval: resize to size / crop_pct then centre crop
    (a direct resize to the input size when crop_pct == 1), both followed by ToTensor + Normalize
    with the backbone's statistics. ``input_size``/``mean``/``std`` override the config, e.g.
    28 px and mean = std = 0.5 for a Fashion-MNIST ViT.
    """
    height, width, channels = _size_tuple(input_size if input_size is not None else data_config["input_size"])
    if channels is None:
        channels = _size_tuple(data_config["input_size"])[2] or 3
    mean = tuple(mean if mean is not None else data_config["mean"])
    std = tuple(std if std is not None else data_config["std"])
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"mean {mean} and std {std} need one value per input channel ({channels})")
    name = str(data_config.get("interpolation", "bilinear"))
    if name not in _INTERPOLATIONS:
        raise DataError(f"unknown interpolation '{name}'; expected one of {sorted(_INTERPOLATIONS)}")
    interpolation = _INTERPOLATIONS[name]

    steps: list[Callable[..., Any]] = [ToModelMode(channels)]
    if train:
        steps += [
            T.RandomResizedCrop((height, width), scale=train_scale, interpolation=interpolation),
            *([T.RandomHorizontalFlip()] if hflip else []),
        ]
    else:
        steps += _eval_resize(data_config, height, width, interpolation)
    steps += [T.ToTensor(), T.Normalize(mean=mean, std=std)]
    return T.Compose(steps)


def _eval_resize(
    data_config: Mapping[str, Any], height: int, width: int, interpolation: InterpolationMode
) -> list[Callable[..., Any]]:
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    if not 0.0 < crop_pct <= 1.0:
        raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if crop_pct == 1.0:
        return [T.Resize((height, width), interpolation=interpolation)]
    mode = data_config.get("crop_mode") or "center"
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if mode == "squash":
        resize = T.Resize(scaled, interpolation=interpolation)
    elif mode == "center":
        # Like timm: a square target resizes the shorter side, keeping the aspect ratio.
        resize = T.Resize(scaled[0] if height == width else scaled, interpolation=interpolation)
    else:
        raise DataError(f"crop_mode '{mode}' is not supported; use 'center' or 'squash'")
    return [resize, T.CenterCrop((height, width))]
