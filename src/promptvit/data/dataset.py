"""A torch ``Dataset`` over :class:`LabeledSamples`, with clear errors for unreadable images."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from promptvit.data.errors import DataError
from promptvit.data.sources import LabeledSamples, Sample


@dataclass(frozen=True)
class SkippedFile:
    """An image left out by ``skip_corrupt``; ``str()`` gives one line for the run folder."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}\t{self.reason}"


def _describe(sample: Sample, samples: LabeledSamples) -> str:
    line = f", line {sample.line}" if sample.line is not None else ""
    return f"image {sample.path} (listed in {samples.source}{line})"


def load_image(sample: Sample, samples: LabeledSamples) -> Image.Image:
    """Decode one sample fully, turning every I/O or decoding failure into a DataError.

    Decoding happens here (``load()``) rather than lazily inside the transform, so a truncated file
    is reported with its name instead of surfacing as an obscure error in a worker process.
    """
    if sample.path is None:
        return _array_to_image(samples.arrays[sample.array_index])  # type: ignore[index]
    where = _describe(sample, samples)
    try:
        size = os.path.getsize(sample.path)
    except OSError:
        raise DataError(f"{where} does not exist. Fix the list or the image root.") from None
    if size == 0:
        raise DataError(f"{where} is an empty (0-byte) file. Re-copy it, or pass skip_corrupt=True.")
    try:
        with open(sample.path, "rb") as handle:
            image = Image.open(handle)
            _check_sides(image.size, where)  # from the header, before decoding
            image.load()
            image = ImageOps.exif_transpose(image)  # the pixels the way any viewer shows them
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise DataError(f"{where} is too large to decode safely ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        reason = "is truncated" if "truncated" in str(error) else f"is not a readable image ({error})"
        raise DataError(f"{where} {reason}. Re-copy it, or pass skip_corrupt=True.") from None
    return image


MAX_IMAGE_SIDE = 30_000
"""Longest side accepted, in pixels (PIL's pixel-count check alone lets a 1 x 3,000,000 strip through)."""
MAX_ASPECT_RATIO = 100
"""Longest over shortest side accepted: resizing the short side of a thin strip to the model's input size
would blow its long side up (1 x 300,000 px becomes 224 x 67 million)."""


def _check_sides(size: tuple[int, int], where: str) -> None:
    width, height = size
    if min(width, height) < 1 or max(width, height) > MAX_IMAGE_SIDE:
        raise DataError(
            f"{where} is {width}x{height} px; sides must be 1..{MAX_IMAGE_SIDE:,} px. Downscale or crop it, "
            "or pass skip_corrupt=True."
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(
            f"{where} is {width}x{height} px, more than {MAX_ASPECT_RATIO}:1; resizing it to the model's "
            "input would need huge memory. Crop it, or pass skip_corrupt=True."
        )


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    colour = array.ndim == 3 and array.shape[2] in (3, 4)
    if (array.dtype == np.uint8 and (array.ndim == 2 or colour)) or (
        array.dtype == np.uint16 and array.ndim == 2
    ):
        return Image.fromarray(array)  # uint16 becomes 'I;16', converted to 8 bits by the transform
    raise DataError(f"cannot make an image from an array of shape {array.shape} and dtype {array.dtype}")


def find_unreadable(samples: LabeledSamples, workers: int = 8) -> list[SkippedFile]:
    """Try to decode every file-backed sample; return the ones that fail, with the reason.

    Threads suffice because PIL releases the GIL while decoding.
    """
    unique = {s.key: s for s in samples.items if s.path is not None}

    def check(sample: Sample) -> SkippedFile | None:
        try:
            load_image(sample, samples)
        except DataError as error:
            return SkippedFile(path=sample.path or "", reason=str(error))
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check, unique.values()))
    return [r for r in results if r is not None]


class ImageDataset(torch.utils.data.Dataset):
    """Returns ``(image_tensor, target)``: a long scalar (single-label) or a float32 multi-hot vector.

    With ``skip_corrupt=True`` the constructor runs :meth:`validate` and drops unreadable files;
    ``self.skipped`` lists them (with reasons) for the caller to write into the run folder.
    Otherwise an unreadable image raises DataError naming the file when it is first loaded.
    """

    def __init__(
        self,
        samples: LabeledSamples,
        transform: Callable[[Image.Image], torch.Tensor],
        skip_corrupt: bool = False,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.skipped: list[SkippedFile] = []
        self._targets = self._build_targets()
        if skip_corrupt:
            self.validate()

    def _build_targets(self) -> torch.Tensor:
        labels = [s.label for s in self.samples.items]
        if self.samples.multilabel:
            return torch.tensor(labels, dtype=torch.float32).reshape(len(labels), self.samples.num_classes)
        return torch.tensor(labels, dtype=torch.long)

    def validate(self) -> list[SkippedFile]:
        """Decode every image once, up front.

        With ``skip_corrupt`` the unreadable ones are dropped and returned (also kept in
        ``self.skipped``); without it, DataError lists them all at once, which beats failing on
        one file per run.
        """
        bad = find_unreadable(self.samples)
        if not bad:
            return []
        if not self.skip_corrupt:
            listing = "\n".join(f"  {b.reason}" for b in bad)
            raise DataError(
                f"{len(bad)} unreadable images in {self.samples.source}:\n{listing}\n"
                "Fix or remove them, or pass skip_corrupt=True to leave them out."
            )
        bad_paths = {b.path for b in bad}
        kept = [s for s in self.samples.items if s.path not in bad_paths]
        if not kept:
            raise DataError(f"every image in {self.samples.source} is unreadable (first: {bad[0].reason})")
        self.samples = self.samples.subset(kept)
        self._targets = self._build_targets()
        self.skipped.extend(bad)
        return bad

    def __len__(self) -> int:
        return len(self.samples.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_image(self.samples.items[index], self.samples)
        return self.transform(image), self._targets[index]

    def targets_tensor(self) -> torch.Tensor:
        """All targets: (N,) long or (N, C) float32, e.g. for class weights or metrics."""
        return self._targets.clone()

    @property
    def class_names(self) -> list[str]:
        return self.samples.class_names

    @property
    def multilabel(self) -> bool:
        return self.samples.multilabel
