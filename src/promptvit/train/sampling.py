"""The order of training images per epoch (``TrainConfig.sampler``): a seeded shuffle, or class-balanced batches.

``class_balanced`` (DA-VPT's class sampler, docs/recipes.md, "davpt-fgvc"): every batch holds
``batch_size // samples_per_class`` class draws of ``samples_per_class`` images each. The classes come from
shuffled rounds over all classes, one round after the other, so in an epoch every class is drawn the same
number of times (give or take one where the epoch ends inside a round); the images of a class come from
shuffled rounds over that class's images, so a class's images are used evenly and a class with fewer images
than ``samples_per_class`` repeats them. An epoch has ``max(1, N // batch_size)`` batches, as the authors'
sampler has ``N // batch_size``. Multi-label images count for their rarest positive class (all-negative
images form one more class). The batches of an epoch are drawn once, from the epoch's generator, when the
sampler is built, so every loader built from it (images, cached prefixes, ranks under torchrun) sees the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from promptvit.cache import fast_targets
from promptvit.errors import ConfigError
from promptvit.train.config import TrainConfig


def balance_classes(targets: torch.Tensor) -> list[int]:
    """The class each image counts for: its label, or for (N, C) multi-hot targets the rarest positive class
    (C for an all-negative image)."""
    if targets.dim() == 1:
        return [int(t) for t in targets.tolist()]
    positives = targets > 0.5
    counts = positives.sum(dim=0)
    rarity = torch.where(positives, counts.unsqueeze(0), torch.iinfo(torch.long).max)
    rarest = rarity.argmin(dim=1)  # ties go to the lower class index
    return torch.where(positives.any(dim=1), rarest, targets.shape[1]).tolist()


class ClassBalancedBatches(Sampler[list[int]]):
    """Batches of dataset indices, ``classes_per_batch x samples_per_class`` per batch (see the module docstring)."""

    def __init__(
        self, classes: Sequence[int], batch_size: int, samples_per_class: int, generator: torch.Generator
    ) -> None:
        if batch_size % samples_per_class:
            raise ConfigError(
                f"train.batch_size {batch_size} must be a multiple of train.samples_per_class {samples_per_class}"
            )
        if not classes:
            raise ConfigError("train.sampler 'class_balanced' got an empty training set")
        members: dict[int, list[int]] = {}
        for index, label in enumerate(classes):
            members.setdefault(label, []).append(index)
        pools = [members[c] for c in sorted(members)]
        draws = max(1, len(classes) // batch_size) * (batch_size // samples_per_class)
        order = _rounds(len(pools), draws, generator)
        queues: list[list[int]] = [[] for _ in pools]
        flat: list[int] = []
        for c in order:
            for _ in range(samples_per_class):
                if not queues[c]:
                    queues[c] = [pools[c][i] for i in torch.randperm(len(pools[c]), generator=generator).tolist()]
                flat.append(queues[c].pop())
        self.batches = [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def _rounds(size: int, length: int, generator: torch.Generator) -> list[int]:
    """``length`` values from consecutive shuffled rounds over ``range(size)``."""
    values: list[int] = []
    while len(values) < length:
        values += torch.randperm(size, generator=generator).tolist()
    return values[:length]


def batches_per_epoch(config: TrainConfig, num_images: int) -> int:
    """Optimiser steps in one epoch over ``num_images`` training images under ``config.sampler``."""
    if config.sampler == "class_balanced":
        return max(1, num_images // config.batch_size)
    return -(-num_images // config.batch_size)


def epoch_batches(config: TrainConfig, dataset: Dataset, generator: torch.Generator) -> ClassBalancedBatches | None:
    """The epoch's class-balanced batches, or None for the plain seeded shuffle."""
    if config.sampler != "class_balanced":
        return None
    targets = fast_targets(dataset)
    if targets is None:
        raise ConfigError(
            f"train.sampler 'class_balanced' reads the training labels without loading images; a "
            f"{type(dataset).__name__} does not allow it (use an ImageDataset or TensorDataset, or sampler 'shuffle')"
        )
    return ClassBalancedBatches(balance_classes(targets), config.batch_size, config.samples_per_class, generator)
