"""Readers for benchmark split files as people have them on disk: VTAB-1k list files and VPT's FGVC JSONs.

* VTAB-1k (the copy distributed by NOAH, SSF, RepAdapter, PETL_Vision): ``vtab-1k/<folder>/`` holds
  ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``, one ``relative/path label``
  per line (the path is relative to the task folder, the label an integer class index), images beside them.
  The task folders are named as in that distribution (``cifar`` for CIFAR-100); :data:`VTAB_NAMES` maps
  them to the task_adaptation registry names and the TFDS data sets.
* FGVC (the split files released with VPT): per data set ``train.json``, ``val.json`` and ``test.json``,
  each one JSON object ``{"image/path.jpg": class_id, ...}``; the paths are relative to an image folder
  that depends on the data set (:data:`FGVC_FOLDERS`). A class id is any sortable JSON value, as VPT's reader
  sorts them (``json_dataset.py:60``): integers (need not start at 0, may be negative), other numbers or
  strings, but not numbers and strings mixed. The ids are mapped to contiguous indices in sorted order over
  all splits (numbers numerically, strings in natural order), as VPT's reader does within a split.

Both readers return :class:`LabeledSamples` whose class names are the label values as strings, so a
split that lacks a class still maps every other label to the same index as its sibling splits (pass
``class_names`` from the union over the splits).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from promptvit.data.errors import DataError
from promptvit.data.sources import (
    MAX_CLASSES,
    LabeledSamples,
    Sample,
    _check_files_exist,
    _require_file,
    read_text_lines,
)


@dataclass(frozen=True)
class VTABNames:
    """One VTAB-1k task under its three names, and its class count."""

    folder: str  # the task folder in the NOAH/SSF/PETL_Vision distribution
    registry: str  # the task_adaptation registry name (VPT's DATA.NAME without 'vtab-')
    tfds: str  # the TFDS data set the task is built from
    num_classes: int


#: promptvit task name -> the task's other names (folder of the common image copy, VTAB, TFDS)
VTAB_NAMES: dict[str, VTABNames] = {
    "cifar100": VTABNames("cifar", "cifar(num_classes=100)", "cifar100", 100),
    "caltech101": VTABNames("caltech101", "caltech101", "caltech101", 102),
    "dtd": VTABNames("dtd", "dtd", "dtd", 47),
    "oxford_flowers102": VTABNames("oxford_flowers102", "oxford_flowers102", "oxford_flowers102", 102),
    "oxford_iiit_pet": VTABNames("oxford_iiit_pet", "oxford_iiit_pet", "oxford_iiit_pet", 37),
    "svhn": VTABNames("svhn", "svhn", "svhn_cropped", 10),
    "sun397": VTABNames("sun397", "sun397", "sun397", 397),
    "patch_camelyon": VTABNames("patch_camelyon", "patch_camelyon", "patch_camelyon", 2),
    "eurosat": VTABNames("eurosat", "eurosat", "eurosat", 10),
    "resisc45": VTABNames("resisc45", "resisc45", "resisc45", 45),
    "diabetic_retinopathy": VTABNames(
        "diabetic_retinopathy",
        'diabetic_retinopathy(config="btgraham-300")',
        "diabetic_retinopathy_detection",
        5,
    ),
    "clevr_count": VTABNames("clevr_count", 'clevr(task="count_all")', "clevr", 8),
    "clevr_dist": VTABNames("clevr_dist", 'clevr(task="closest_object_distance")', "clevr", 6),
    "dmlab": VTABNames("dmlab", "dmlab", "dmlab", 6),
    "kitti": VTABNames("kitti", 'kitti(task="closest_vehicle_distance")', "kitti", 4),
    "dsprites_loc": VTABNames(
        "dsprites_loc", 'dsprites(predicted_attribute="label_x_position",num_classes=16)', "dsprites", 16
    ),
    "dsprites_ori": VTABNames(
        "dsprites_ori", 'dsprites(predicted_attribute="label_orientation",num_classes=16)', "dsprites", 16
    ),
    "smallnorb_azi": VTABNames(
        "smallnorb_azi", 'smallnorb(predicted_attribute="label_azimuth")', "smallnorb", 18
    ),
    "smallnorb_ele": VTABNames(
        "smallnorb_ele", 'smallnorb(predicted_attribute="label_elevation")', "smallnorb", 9
    ),
}

#: the four list files of a VTAB-1k task folder
VTAB_LIST_FILES = {
    "train800": "train800.txt",
    "val200": "val200.txt",
    "train800val200": "train800val200.txt",
    "test": "test.txt",
}


def vtab_task(name: str) -> str:
    """promptvit's task name for any of a task's names (promptvit, distribution folder, VTAB registry).

    TFDS names are accepted only where they name one task (``svhn_cropped``, not ``clevr``).
    """
    if name in VTAB_NAMES:
        return name
    for task, names in VTAB_NAMES.items():
        if name in (names.folder, names.registry):
            return task
    matches = [task for task, names in VTAB_NAMES.items() if names.tfds == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise DataError(f"TFDS data set '{name}' holds several VTAB tasks {matches}; name the task")
    raise DataError(f"unknown VTAB task '{name}'; the 19 tasks are {list(VTAB_NAMES)}")


@dataclass(frozen=True)
class FGVCFolder:
    """Where VPT's FGVC split JSONs expect a data set: its folder name and the image folder inside it."""

    folder: str
    image_dir: str  # '' = the data set folder itself (the JSON paths then start with 'jpg/' or 'car_ims/')


#: promptvit name -> VPT's folder and image root (the JSON keys are relative to the image root)
FGVC_FOLDERS: dict[str, FGVCFolder] = {
    "cub": FGVCFolder("CUB_200_2011", "images"),
    "nabirds": FGVCFolder("nabirds", "images"),
    "flowers": FGVCFolder("OxfordFlower", ""),
    "dogs": FGVCFolder("Stanford-dogs", "Images"),
    "cars": FGVCFolder("Stanford-cars", ""),
}


Label = int | float | str


def _label_names(
    source: str, labels: list[tuple[int, Label]], class_names: Sequence[str] | None
) -> list[str]:
    """Class names for the labels: the given list (every label must be in it) or the sorted values."""
    if class_names is None:
        return [str(v) for v in sorted({label for _, label in labels})]  # type: ignore[type-var]
    names = list(class_names)
    known = set(names)
    unknown = [(line, label) for line, label in labels if str(label) not in known]
    if unknown:
        line, label = unknown[0]
        raise DataError(
            f"{source}, line {line}: label {label} is not among the task's classes "
            f"({names[0]}..{names[-1]}, {len(names)} classes). Fix the label or the list file."
        )
    return names


def _samples(
    source: str,
    rows: list[tuple[int, str, Label]],
    image_root: Path,
    class_names: Sequence[str] | None,
    check_files: bool,
) -> LabeledSamples:
    if not rows:
        raise DataError(f"{source} lists no images")
    names = _label_names(source, [(line, label) for line, _, label in rows], class_names)
    index = {name: i for i, name in enumerate(names)}
    items = [
        Sample(path=os.path.join(image_root, rel), label=index[str(label)], line=line)
        for line, rel, label in rows
    ]
    if check_files:
        _check_files_exist(items, source, image_root)
    return LabeledSamples(items=items, class_names=names, multilabel=False, source=source)


def read_label_list(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    class_names: Sequence[str] | None = None,
    check_files: bool = True,
) -> LabeledSamples:
    """Read a ``relative/path label`` list (VTAB-1k's ``train800.txt`` ... ``test.txt``).

    The label is the last whitespace-separated field, so a path may contain spaces. Paths are relative to
    ``image_root`` (default: the list's folder, as in the VTAB-1k copies).
    """
    list_path = Path(path)
    _require_file(list_path, "list file")
    root = Path(image_root) if image_root is not None else list_path.parent
    source = str(list_path)
    rows: list[tuple[int, str, int]] = []
    for number, line in enumerate(read_text_lines(list_path), start=1):
        text = line.strip()
        if not text:
            continue
        parts = text.rsplit(maxsplit=1)
        label = _int_label(parts[1]) if len(parts) == 2 else None
        if label is None:
            raise DataError(
                f"{source}, line {number}: cannot parse {text!r}; expected 'relative/path.jpg LABEL' "
                "with an integer class index (the VTAB-1k list format)"
            )
        if label >= MAX_CLASSES:
            raise DataError(
                f"{source}, line {number}: label {label} is not a class index (more than {MAX_CLASSES:,} "
                "classes); a typo? Fix the label"
            )
        rows.append((number, parts[0], label))
    return _samples(source, rows, root, class_names, check_files)


def _int_label(text: str) -> int | None:
    if not text.isdigit():  # int() would also take '+1', '1_000' and other digits than 0-9
        return None
    return int(text) if text.isascii() else None


def _fgvc_class_id(value: object) -> Label | None:
    """A JSON value as a class id (whole floats as integers, so 3 and 3.0 are one class), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() else value
    return value


def read_fgvc_json(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    class_names: Sequence[str] | None = None,
    check_files: bool = True,
) -> LabeledSamples:
    """Read one of VPT's FGVC split files: a JSON object mapping image paths to class ids (module docstring).

    Paths are relative to ``image_root`` (default: the JSON's folder). ``line`` of each sample is its
    1-based position in the object, which is what an error can point at.
    """
    json_path = Path(path)
    _require_file(json_path, "FGVC split file")
    source = str(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f'{source} is not valid JSON ({error}); expected {{"path.jpg": class_id, ...}}'
        ) from None
    if not isinstance(data, dict):
        raise DataError(
            f'{source} holds a {type(data).__name__}; expected an object {{"path.jpg": class_id}}'
        )
    rows: list[tuple[int, str, Label]] = []
    for number, (rel, value) in enumerate(data.items(), start=1):
        label = _fgvc_class_id(value)
        if label is None:
            raise DataError(
                f"{source}: entry {number} ({rel!r}) has label {value!r}; class ids must be numbers or strings"
            )
        rows.append((number, rel, label))
    kinds = {isinstance(label, str) for _, _, label in rows}
    if len(kinds) > 1:
        first_text = next(n for n, _, label in rows if isinstance(label, str))
        raise DataError(
            f"{source}: entry {first_text} has a text class id while others are numbers; VPT sorts the ids, so "
            "they must all be numbers or all text. Fix the JSON"
        )
    root = Path(image_root) if image_root is not None else json_path.parent
    return _samples(source, rows, root, class_names, check_files)
