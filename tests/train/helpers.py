"""Tiny synthetic datasets for the engine tests: 16x16 images whose colour encodes the class."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

import promptvit
from promptvit.model import PromptModel
from tests.conftest import build_tiny

#: per-class colour offsets: linearly separable through the patch embedding of a random tiny ViT
COLORS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, -1.0, -1.0]])
CLASSES = ["red", "green", "blue", "dark"]


def colour_images(labels: torch.Tensor, colours: torch.Tensor, seed: int, strength: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(labels.shape[0], 3, 16, 16, generator=g)
    return noise + strength * colours[:, :, None, None]


def single_label_set(n: int, seed: int, strength: float = 1.5) -> TensorDataset:
    """``n`` images, classes 0..3 in turn; the target is a long scalar."""
    labels = torch.arange(n) % 4
    return TensorDataset(colour_images(labels, COLORS[labels], seed, strength), labels)


def multi_label_set(n: int, seed: int, absent: int | None = None) -> TensorDataset:
    """Images with 3 possible labels (red, green, blue channels); the target is a float multi-hot vector.

    ``absent`` names a class that is never positive (like Endo's "tumor" in the MedFMC test file).
    """
    g = torch.Generator().manual_seed(seed + 1000)
    targets = (torch.rand(n, 3, generator=g) < 0.5).float()
    if absent is not None:
        targets[:, absent] = 0.0
    return TensorDataset(colour_images(targets, 2.0 * targets, seed, 1.0), targets)


def tiny_model(
    method: str = "linear", num_classes: int = 4, seed: int = 0, kind: str = "vit_token"
) -> PromptModel:
    # the engine's epochs are what these tests train: linear by the optimiser, not its L-BFGS default
    options = {"solver": "sgd"} if method == "linear" else {}
    return promptvit.wrap(build_tiny(kind, num_classes=num_classes, seed=seed), method, **options)


class PoisonAfter(Dataset):
    """Wraps a dataset; once ``limit`` items were read, images come back as NaN (a corrupt input)."""

    def __init__(self, data: Dataset, limit: int) -> None:
        self.data = data
        self.limit = limit
        self.reads = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image, target = self.data[index]
        self.reads += 1
        if self.reads > self.limit:
            image = torch.full_like(image, float("nan"))
        return image, target
