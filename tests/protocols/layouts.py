"""On-disk fixtures in the layouts people have: the VTAB-1k list copy and VPT's FGVC split JSONs.

File names and line formats are the real ones (``train800.txt`` ... with ``relative/path label`` lines;
``train.json`` ... with ``{"path": class_id}``); the images are a few pixels each. Every writer returns
the expected samples per split, ``{split: [(relative path, label), ...]}``, as an independent reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from .helpers import save_image, stable_seed

VTAB_SPLIT_SIZES = {"train800": 4, "val200": 2, "test": 3}


def write_vtab_lists(
    task_dir: Path, classes: int = 3, only_final: bool = False, sizes: dict[str, int] | None = None
) -> dict[str, list[tuple[str, int]]]:
    """``<task_dir>/{train800,val200,train800val200,test}.txt`` + ``images/``; train800 lacks the last class.

    ``only_final`` writes just ``train800val200.txt`` and ``test.txt``, as some copies ship.
    """
    sizes = sizes or VTAB_SPLIT_SIZES
    rows: dict[str, list[tuple[str, int]]] = {s: [] for s in ("train800", "val200", "test")}
    for split, count in sizes.items():
        for c in range(classes):
            if split == "train800" and c == classes - 1:
                continue
            for i in range(count):
                rel = f"images/{split}_{c}_{i}.jpg"
                save_image(task_dir / rel, c, classes, stable_seed(str(task_dir.name), split, c, i))
                rows[split].append((rel, c))
    rows["train800val200"] = rows["train800"] + rows["val200"]
    for split, entries in rows.items():
        if only_final and split in ("train800", "val200"):
            continue
        (task_dir / f"{split}.txt").write_text("".join(f"{rel} {label}\n" for rel, label in entries))
    return rows


FGVC_IMAGE_DIRS = {"CUB_200_2011": "images", "Stanford-cars": "", "Stanford-dogs": "Images"}


def write_fgvc_json(
    base: Path, classes: int = 3, sizes: dict[str, int] | None = None, first_id: int = 1
) -> dict[str, list[tuple[str, int]]]:
    """``<base>/{train,val,test}.json`` with class ids starting at ``first_id`` (VPT's CUB ids start at 1),
    images under the data set's image folder (``images/``, ``Images/`` or the folder itself)."""
    sizes = sizes or {"train": 4, "val": 2, "test": 2}
    image_dir = base / FGVC_IMAGE_DIRS.get(base.name, "images")
    rows: dict[str, list[tuple[str, int]]] = {}
    for split, count in sizes.items():
        entries = {}
        for c in range(classes):
            for i in range(count):
                rel = f"{c + first_id:03d}.class_{c}/{split}_{i}.jpg"
                if base.name == "Stanford-cars":
                    rel = f"car_ims/{c}{split}{i:04d}.jpg"
                save_image(image_dir / rel, c, classes, stable_seed(base.name, split, c, i))
                entries[rel] = c + first_id
        (base / f"{split}.json").write_text(json.dumps(entries))
        rows[split] = list(entries.items())
    return rows


def write_medfmc_baseline(root: Path) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """``NeoJaundice/`` and ``Retino/`` as the MedFMC few-shot baseline ships them: ``images/``,
    ``fewshot-pool.txt`` and ``test.txt`` with ``name.png label`` lines (three photos per baby, '0012-1.png')."""
    written: dict[str, dict[str, list[tuple[str, int]]]] = {}
    for folder, classes in (("NeoJaundice", 2), ("Retino", 5)):
        rows: dict[str, list[tuple[str, int]]] = {"fewshot-pool.txt": [], "test.txt": []}
        for file, start in (("fewshot-pool.txt", 0), ("test.txt", 50)):
            for i in range(start, start + 3 * classes):
                label = i % classes
                names = (
                    [f"{i:04d}-{p}.png" for p in (1, 2, 3)]
                    if folder == "NeoJaundice"
                    else [f"2023011612{i:08d}.png"]
                )
                for name in names:
                    save_image(root / folder / "images" / name, label, classes, stable_seed(folder, name))
                    rows[file].append((name, label))
            (root / folder / file).write_text("".join(f"{n} {label}\n" for n, label in rows[file]))
        written[folder] = rows
    return written
