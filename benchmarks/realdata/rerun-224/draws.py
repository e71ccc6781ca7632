"""Draws of the cnn_derm_224 protocol (HAM10000 K=10, EfficientNet-Lite0 at 224 px) with every split through the
evaluation transform and its pre-logit features: what the probe scripts beside this file share."""

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from promptvit.data import ImageDataset, build_transforms
from promptvit.experiment import build_model, data_config_for
from promptvit.protocols import load_sweep_config
from promptvit.protocols.runner import materialise
from promptvit.train.probe import extract_features

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2].parent / "shared"
CPU = torch.device("cpu")


def eval_draws(seeds: list[int]) -> Iterator[dict[str, Any]]:
    """Per seed: ``spec``, ``split``, ``model`` (linear, untrained head), ``sets`` (train/val/test datasets
    with the eval transform, direct resize) and ``feats`` (their features and targets). Exits 0 without
    ../shared."""
    if not SHARED.is_dir():
        print(f"{SHARED} not found: skipping")
        sys.exit(0)
    torch.set_num_threads(1)
    config = load_sweep_config(HERE / "cnn_derm_224.yaml", {"shared": str(SHARED)})
    config = config.model_copy(update={"protocol": config.protocol.model_copy(update={"seeds": seeds})})
    for spec in config.protocol.run_specs(config.base, method="linear"):
        split = materialise(spec)
        model = build_model(spec.config, split.train.num_classes)
        transform = build_transforms({**data_config_for(model, spec.config.backbone), "crop_pct": 1.0}, train=False)
        sets = {k: ImageDataset(getattr(split, k), transform, False) for k in ("train", "val", "test")}
        feats = {k: extract_features(model, v, batch_size=32, device=CPU) for k, v in sets.items()}
        yield {"spec": spec, "split": split, "model": model, "sets": sets, "feats": feats}
