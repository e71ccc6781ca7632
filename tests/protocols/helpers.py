"""Tiny on-disk fixtures for protocol tests: image folders, MedFMC/VTAB/FGVC roots, a tiny ViT config."""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TINY_VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_BACKBONE = {"name": "vit_tiny_patch16_224", "options": TINY_VIT}
TINY_TRAIN = {
    "epochs": 2,
    "batch_size": 4,
    "optimizer": "adamw",
    "lr": 0.01,
    "eval_batch_size": 32,
    "warmup_epochs": 0,  # set, so that a protocol's recipe (VPT: 10 warm-up epochs) does not apply
}


def tiny_base(**train: Any) -> dict[str, Any]:
    return {"backbone": dict(TINY_BACKBONE), "train": {**TINY_TRAIN, **train}}


def stable_seed(*parts: Any) -> int:
    """A seed from any values, the same in every process (``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def save_image(path: Path, label: int, classes: int, seed: int, size: int = 16) -> None:
    """Class c is bright in horizontal band c, so a tiny model can learn something."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    band = max(size // max(classes, 1), 1)
    start = (label * band) % size
    pixels[start : start + band] += 180
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_image_folder(
    root: Path, classes: int = 3, per_class: int = 8, prefix: str = "img", seed: int = 0
) -> Path:
    for c in range(classes):
        for i in range(per_class):
            save_image(root / f"class_{c}" / f"{prefix} {i}.png", c, classes, seed * 1000 + c * 100 + i)
    return root


def write_vtab_root(
    root: Path, tasks: list[str], classes: int = 3, per_split: dict[str, int] | None = None
) -> Path:
    """<root>/<task>/{train800,val200,train800val200,test}/<class>/*.png with tiny counts.

    train800 lacks the last class entirely (as a 397-class task's 800 images would), so the class list
    must come from the union of the splits.
    """
    per_split = per_split or {"train800": 4, "val200": 2, "test": 3}
    for t, task in enumerate(tasks):
        for c in range(classes):
            for split in ("train800", "val200", "test"):
                if split == "train800" and c == classes - 1:
                    (root / task / split / str(c)).mkdir(parents=True, exist_ok=True)  # empty class folder
                    continue
                for i in range(per_split[split]):
                    name = f"{split}_{c}_{i}.png"
                    save_image(root / task / split / str(c) / name, c, classes, stable_seed(t, split, c, i))
                    if split != "test":
                        save_image(
                            root / task / "train800val200" / str(c) / name,
                            c,
                            classes,
                            stable_seed(t, split, c, i),
                        )
    return root


def write_fgvc_root(
    root: Path, datasets: dict[str, int], per_class: int = 10, test_per_class: int = 2
) -> Path:
    for d, (name, classes) in enumerate(datasets.items()):
        for c in range(classes):
            for i in range(per_class):
                save_image(
                    root / name / "train" / f"c{c:03d}" / f"{i}.png", c, classes, d * 10**5 + c * 100 + i
                )
            for i in range(test_per_class):
                save_image(
                    root / name / "test" / f"c{c:03d}" / f"t{i}.png", c, classes, d * 10**5 + c * 100 + 50 + i
                )
    return root


MEDFMC_NUM_CLASSES = {"chest": 19, "endo": 4, "colon": 2}


def _label_text(dataset: str, label: Any) -> str:
    if dataset == "chest":
        return ",".join(map(str, label))
    if dataset == "endo":
        return " ".join(map(str, label))
    return str(label)


def _medfmc_lines(base: Path, dataset: str, count: int, tag: str, rng: random.Random) -> list[str]:
    n = MEDFMC_NUM_CLASSES[dataset]
    lines = []
    for i in range(count):
        if dataset == "colon":
            label: Any = i % 2
            name = f"slide {tag}{i:03d}_p{i:04d}.png"
            image_label = label
        else:
            label = tuple(1 if (i + c) % n == 0 or rng.random() < 0.2 else 0 for c in range(n))
            name = f"{tag}{i:03d}_2021.12_0007_{i}.png"
            image_label = label.index(1) if 1 in label else 0
        save_image(base / "images" / name, image_label, n, stable_seed(dataset, tag, i))
        lines.append(f"{name} {_label_text(dataset, label)}")
    return lines


def write_medfmc_root(
    root: Path,
    datasets: tuple[str, ...] = ("chest", "colon", "endo"),
    shots: tuple[int, ...] = (1, 5, 10),
    exps: tuple[int, ...] = (1, 2, 3, 4, 5),
    trainval_size: int = 24,
    test_size: int = 12,
) -> Path:
    """A tiny MedFMC root with the official file names and line formats (colon names contain spaces).

    Each ``{K}-shot_train_exp{E}`` lists K + E lines of trainval; the official val file overlaps train,
    like the real chest/endo files, so a test can check it is never used.
    """
    rng = random.Random(0)
    for dataset in datasets:
        base = root / dataset
        trainval = _medfmc_lines(base, dataset, trainval_size, "tv", rng)
        test = _medfmc_lines(base, dataset, test_size, "te", rng)
        (base / "trainval.txt").write_text("\n".join(trainval) + "\n")
        (base / "test_WithLabel.txt").write_text("\n".join(test) + "\n")
        for k in shots:
            for e in exps:
                start = (e * 3) % trainval_size
                train = [trainval[(start + j) % trainval_size] for j in range(min(k + e, trainval_size - 4))]
                (base / f"{dataset}_{k}-shot_train_exp{e}.txt").write_text("\n".join(train) + "\n")
                val = train[:2] + [line for line in trainval if line not in train][:3]  # overlaps train
                (base / f"{dataset}_{k}-shot_val_exp{e}.txt").write_text("\n".join(val) + "\n")
    return root
