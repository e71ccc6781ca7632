"""Turn a :class:`RunSpec` into its train/val/test samples, leak-free and deterministic.

* ``spec.splits is None``: the data layer's protocols (``make_split``: MedFMC's official lists with
  val = trainval - train, the generic seeded stratified few-shot split, MedMNIST ``.npz`` splits); with
  ``test_per_class`` the generic split draws that many test images per class instead of a fraction.
* ``spec.splits`` set: fixed sources (VTAB-1k folders, FGVC train/test), with an optional stratified seeded
  hold-out of the training source for validation (FGVC's 90/10).

``val_cap`` then keeps at most that many validation images per class (seeded), for data sets whose
official validation split is large (MedMNIST) and is evaluated every epoch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from promptvit.data import (
    IMAGE_EXTENSIONS,
    DataError,
    FewShotSplit,
    LabeledSamples,
    Sample,
    cap_per_class,
    make_few_shot_split,
    read_csv,
    read_fgvc_json,
    read_label_list,
    stratified_split,
)
from promptvit.data.spec import load_samples, make_split
from promptvit.protocols.spec import ProtocolError, RunSpec, SourceSpec, SplitSpec


def natural_key(name: str) -> tuple:
    """Sort '2' before '10' (VTAB and FGVC class folders are often numbers); a name that is a number ('-3',
    '1.5': FGVC JSON class ids) sorts by its value."""
    if re.fullmatch(r"-?\d+(\.\d+)?", name):  # shaped as a plain digit run's key, so mixed lists sort as before
        return ((1, 0, ""), (0, float(name), ""), (1, 0, ""))
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def folder_classes(path: str | Path) -> list[str]:
    """Class sub-folder names of an image folder (empty ones included: a split may lack a class)."""
    root = Path(path)
    if not root.is_dir():
        raise ProtocolError(f"image folder not found: {root}")
    return sorted(
        (p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural_key
    )


def read_folder(path: str | Path, class_names: list[str]) -> LabeledSamples:
    """Read ``<path>/<class>/**/<image>`` with a fixed class list; empty or absent class folders are allowed."""
    root = Path(path)
    present = folder_classes(root)
    unknown = [c for c in present if c not in class_names]
    if unknown:
        raise ProtocolError(f"{root}: class folders {unknown} are not among the task's classes")
    items = []
    for index, name in enumerate(class_names):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        files = sorted(
            os.path.join(dirpath, file)
            for dirpath, _, filenames in os.walk(class_dir)
            for file in filenames
            if Path(file).suffix.lower() in IMAGE_EXTENSIONS and not file.startswith(".")
        )
        items.extend(Sample(path=f, label=index) for f in files)
    if not items:
        raise ProtocolError(f"image folder {root} holds no images under its class sub-folders")
    return LabeledSamples(items=items, class_names=list(class_names), multilabel=False, source=str(root))


def _read_source(source: SourceSpec, class_names: list[str] | None, check_files: bool = True) -> LabeledSamples:
    if source.kind == "folder":
        return read_folder(source.path, class_names or folder_classes(source.path))
    if source.kind in ("list", "json"):
        reader = read_label_list if source.kind == "list" else read_fgvc_json
        return reader(source.path, source.image_root, class_names, check_files)
    return read_csv(
        source.path,
        image_root=source.image_root,
        file_column=source.file_column,
        label_column=source.label_column,
        class_names=class_names,
        file_suffix=source.file_suffix,
        group_column=source.group_column,
    )


def _source_classes(source: SourceSpec) -> list[str]:
    if source.kind == "folder":
        return folder_classes(source.path)
    return _read_source(source, None, check_files=False).class_names


def source_class_names(splits: SplitSpec) -> list[str]:
    """Union of the classes of every source of ``splits``, naturally sorted."""
    sources = [splits.train, splits.val, splits.test, *splits.class_sources, *splits.more_train]
    names: set[str] = set()
    for source in sources:
        if source is not None:
            names.update(_source_classes(source))
    if not names:
        raise ProtocolError(f"no classes found in {splits.train.path}")
    return sorted(names, key=natural_key)


def _empty(like: LabeledSamples, what: str) -> LabeledSamples:
    return like.subset([], f"(no {what} set)")


def fixed_split(splits: SplitSpec) -> FewShotSplit:
    """Train/val/test from fixed sources with one shared class list; val from a hold-out if asked."""
    class_names = source_class_names(splits)
    train = _read_source(splits.train, class_names)
    for extra in splits.more_train:
        more = _read_source(extra, class_names)
        train = train.subset([*train.items, *more.items], f"{train.source} + {more.source}")
    if splits.holdout_fraction is not None:
        if splits.val is not None:
            raise ProtocolError("give either a val source or holdout_fraction, not both")
        train, val = stratified_split(train, test_fraction=splits.holdout_fraction, seed=splits.holdout_seed)
        train = train.subset(train.items, f"{splits.train.path} (train, seed {splits.holdout_seed})")
        val = val.subset(
            val.items, f"{splits.train.path} (val {splits.holdout_fraction:g}, seed {splits.holdout_seed})"
        )
    else:
        val = _read_source(splits.val, class_names) if splits.val is not None else _empty(train, "val")
    test = _read_source(splits.test, class_names) if splits.test is not None else _empty(train, "test")
    return FewShotSplit(train=train, val=val, test=test)


def materialise(spec: RunSpec) -> FewShotSplit:
    """The samples of ``spec`` (see the module docstring). Raises DataError/ProtocolError with the cause."""
    seed = spec.split_seed if spec.split_seed is not None else spec.seed
    data = spec.config.data
    if spec.splits is not None:
        split = fixed_split(spec.splits)
    elif spec.test_per_class is not None and data.kind in ("folder", "csv", "digits"):
        samples = load_samples(data)
        if data.classes:
            samples = samples.select_classes(data.classes)
        if not data.shots:
            raise ProtocolError("test_per_class needs data.shots (a few-shot draw)")
        split = make_few_shot_split(
            samples, data.shots, seed, test_per_class=spec.test_per_class, val_per_class=data.val_per_class
        )
    else:
        split = make_split(data, seed)
    if spec.val_cap is not None and len(split.val):
        split = FewShotSplit(
            train=split.train, val=cap_per_class(split.val, spec.val_cap, seed + 1), test=split.test
        )
    check_disjoint(split)
    return split


def check_disjoint(split: FewShotSplit) -> None:
    """Raise DataError if a file is in two of train/val/test (a leak would invalidate selection)."""
    parts = {"train": split.train, "val": split.val, "test": split.test}
    files = {name: {s.key for s in part.items if s.path is not None} for name, part in parts.items()}
    rows = {name: {s.key for s in part.items if s.path is None} for name, part in parts.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = files[a] & files[b]
        # array rows are comparable only within one array (MedMNIST's splits are separate arrays)
        if parts[a].arrays is not None and parts[a].arrays is parts[b].arrays:
            shared |= rows[a] & rows[b]
        if shared:
            example = sorted(os.path.basename(k) for k in shared)[:3]
            raise DataError(
                f"{len(shared)} images are in both {a} and {b} (e.g. {example}); fix the split sources"
            )
