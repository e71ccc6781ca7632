"""Check a data set before training on it: what ``promptvit data check`` reports and training enforces.

:func:`read_layout` reads a data set the way training would (VTAB-1k lists or folders, VPT's FGVC JSONs,
MedFMC lists, ``train/ val/ test/`` folders, one class folder, a CSV) into named splits plus the pairs of
splits that must not share images. :func:`check_splits` then opens every file once (content hash, decode,
size) and reports:

* classes and counts per split, and a class-balance summary;
* files that do not decode (named) -- blocking;
* the same file, or identical file contents, in two splits that must be disjoint -- blocking;
* identical files under different classes, images smaller than the model input, labels present in an
  evaluated split but never in its training split -- warnings (blocking with ``strict``).

:func:`guard_duplicates` is the training-time part: it refuses a train/val/test split with identical
files in two parts unless duplicates are explicitly allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from promptvit.data.benchmarks import (
    FGVC_FOLDERS,
    VTAB_LIST_FILES,
    VTAB_NAMES,
    read_fgvc_json,
    read_label_list,
    vtab_task,
)
from promptvit.data.errors import DataError
from promptvit.data.fewshot import FewShotSplit
from promptvit.data.sources import (
    LabeledSamples,
    Sample,
    npz_split_names,
    read_csv,
    read_image_folder,
    read_medfmc_list,
    read_npz,
)
from promptvit.data.split_files import VTAB_LISTS, is_fewshot_folder, read_fewshot_folder
from promptvit.io import file_sha256

_SHOWN = 5  # examples quoted per problem

LAYOUTS = ("auto", "fewshot", "vtab", "fgvc", "medfmc", "lists", "splits", "folder", "csv", "npz")


@dataclass
class Layout:
    """Named splits of one data set and the (training, evaluated) pairs that must not share images."""

    kind: str
    splits: dict[str, LabeledSamples]
    pairs: list[tuple[str, str]]


@dataclass(frozen=True)
class FileInfo:
    digest: str | None
    size: tuple[int, int] | None
    error: str | None


@dataclass
class Problem:
    severity: str  # 'error' blocks training; 'warning' blocks only with strict
    code: str
    message: str
    files: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    kind: str
    splits: dict[str, dict[str, Any]]
    problems: list[Problem]

    def blocking(self, strict: bool = False) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error" or (strict and p.severity == "warning")]

    def summary_line(self) -> str:
        """One line: images and classes per split, then the problem counts."""
        parts = [
            f"{name} {info['images']} ({info['classes_present']} classes)"
            for name, info in self.splits.items()
        ]
        errors = sum(p.severity == "error" for p in self.problems)
        warnings = sum(p.severity == "warning" for p in self.problems)
        return f"data ({self.kind}): " + ", ".join(parts) + f"; {errors} errors, {warnings} warnings"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "splits": self.splits, "problems": [asdict(p) for p in self.problems]}


# ------------------------------------------------------------------------------------------- reading


def _list_files(base: Path) -> list[str]:
    return [name for name, file in VTAB_LIST_FILES.items() if (base / file).is_file()]


def _fgvc_image_root(base: Path, first: str) -> Path:
    """VPT's image folder for a known data set folder, else the first of images/, Images/, . holding ``first``."""
    for name, folder in FGVC_FOLDERS.items():
        if base.name in (folder.folder, name):
            return base / folder.image_dir
    for candidate in (base / "images", base / "Images", base):
        if (candidate / first).is_file():
            return candidate
    return base


def _medfmc_dataset(base: Path, dataset: str | None) -> str:
    from promptvit.data.sources import MEDFMC_CLASSES

    name = dataset or base.name.lower()
    if name not in MEDFMC_CLASSES:
        raise DataError(
            f"{base}: give --dataset (one of {list(MEDFMC_CLASSES)}); the folder name does not say which "
            "MedFMC data set this is"
        )
    return name


_MEDFMC_POOL = ("trainval.txt", "fewshot-pool.txt")  # the official release; the few-shot baseline's
_MEDFMC_TEST = ("test_WithLabel.txt", "test.txt")


def _medfmc_file(base: Path, names: tuple[str, ...]) -> Path | None:
    return next((base / n for n in names if (base / n).is_file()), None)


def detect_layout(path: str | os.PathLike[str]) -> str:
    """The layout of the data at ``path`` (one of :data:`LAYOUTS` but 'auto'), from the files it holds."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in (".csv", ".npz"):
            return path.suffix.lower()[1:]
        raise DataError(
            f"{path}: give a data folder, a .csv or a .npz file (this is a {path.suffix or 'file'})"
        )
    if not path.is_dir():
        raise DataError(f"data not found: {path}. Check the path (relative paths are from {os.getcwd()}).")
    if is_fewshot_folder(path):
        return "fewshot"
    if (path / "train.json").is_file():
        return "fgvc"
    if _medfmc_file(path, _MEDFMC_POOL) and _medfmc_file(path, _MEDFMC_TEST) and (path / "images").is_dir():
        return "medfmc"
    # before VTAB-1k: both have a test.txt, only a VTAB-1k copy has train800*.txt
    if (path / "train.txt").is_file() and (path / "test.txt").is_file():
        return "lists"
    if _list_files(path) or all((path / s).is_dir() for s in ("train800val200", "test")):
        return "vtab"
    if (path / "train").is_dir() and ((path / "test").is_dir() or (path / "val").is_dir()):
        return "splits"
    return "folder"


def _vtab_classes(base: Path) -> list[str] | None:
    """The class indices of a VTAB-1k task folder named after its task ('cifar', 'dtd'...), else None."""
    try:
        return [str(i) for i in range(VTAB_NAMES[vtab_task(base.name)].num_classes)]
    except DataError:
        return None


def read_layout(
    path: str | os.PathLike[str],
    kind: str = "auto",
    dataset: str | None = None,
    *,
    image_root: str | None = None,
    file_column: str = "file",
    label_column: str = "label",
) -> Layout:
    """Read the data set at ``path`` (see the module docstring); ``kind`` forces a layout. The CSV options
    apply to a ``.csv``."""
    base = Path(path)
    if kind not in LAYOUTS:
        raise DataError(f"unknown data layout '{kind}'; expected one of {', '.join(LAYOUTS)}")
    kind = detect_layout(base) if kind == "auto" else kind
    if kind == "fewshot":
        folder, draw = read_fewshot_folder(base)
        if draw is None:
            splits, wanted = folder.all_splits()
        else:
            files = folder.draw_files(*draw)
            splits = {part: folder._list(file) for part, file in files.items()}
            wanted = [("train", "val"), ("train", "test"), ("val", "test"), ("trainval", "test")]
    elif kind == "vtab":
        present = _list_files(base)
        classes = _vtab_classes(base)  # a known task: every label must be one of its classes
        if present:
            splits = {
                name: read_label_list(base / VTAB_LIST_FILES[name], class_names=classes) for name in present
            }
        else:
            splits = {s: read_image_folder(base / s) for s in VTAB_LIST_FILES if (base / s).is_dir()}
        wanted = [
            ("train800", "val200"),
            ("train800", "test"),
            ("val200", "test"),
            ("train800val200", "test"),
        ]
    elif kind == "fgvc":
        splits = {}
        for split in ("train", "val", "test"):
            file = base / f"{split}.json"
            if file.is_file():
                first = next(iter(read_fgvc_json(file, check_files=False).items)).path or ""
                rel = os.path.relpath(first, base)
                splits[split] = read_fgvc_json(file, _fgvc_image_root(base, rel))
        wanted = [("train", "val"), ("train", "test"), ("val", "test")]
    elif kind == "medfmc":
        name = _medfmc_dataset(base, dataset)
        files = {"trainval": _medfmc_file(base, _MEDFMC_POOL), "test": _medfmc_file(base, _MEDFMC_TEST)}
        files = {k: v for k, v in files.items() if v is not None}
        for file in sorted(base.glob(f"{name}_*-shot_train_exp*.txt")):
            files[file.stem.removeprefix(f"{name}_")] = file
        splits = {split: read_medfmc_list(file, name, base / "images") for split, file in files.items()}
        wanted = [(split, "test") for split in splits if split != "test"]
    elif kind == "lists":
        splits = read_lists_folder(base)
        wanted = [("train", "val"), ("train", "test"), ("val", "test"), ("trainval", "test")]
    elif kind == "splits":
        splits = {s: read_image_folder(base / s) for s in ("train", "val", "test") if (base / s).is_dir()}
        wanted = [("train", "val"), ("train", "test"), ("val", "test")]
    elif kind == "folder":
        splits = {"all": read_image_folder(base)}
        wanted = []
    elif kind == "npz":
        splits = {s: read_npz(base, s) for s in npz_split_names(base)}
        wanted = [("train", "val"), ("train", "test"), ("val", "test")]
    else:
        splits = {
            "all": read_csv(base, image_root=image_root, file_column=file_column, label_column=label_column)
        }
        wanted = []
    if not splits:
        raise DataError(f"{base}: no splits found for the '{kind}' layout")
    pairs = [(a, b) for a, b in wanted if a in splits and b in splits]
    return Layout(kind=kind, splits=splits, pairs=pairs)


def read_lists_folder(base: Path) -> dict[str, LabeledSamples]:
    """``train.txt``, ``val.txt``, ``trainval.txt`` and ``test.txt`` of a folder (``relative/path label``
    lines), with one class list over all of them (a split that lacks a class keeps the others' indices)."""
    files = {s: base / f"{s}.txt" for s in VTAB_LISTS if (base / f"{s}.txt").is_file()}
    # without class names, read_label_list names the classes by their label values: take the union
    values = {int(n) for file in files.values() for n in read_label_list(file, check_files=False).class_names}
    names = [str(v) for v in sorted(values)]
    return {s: read_label_list(file, class_names=names) for s, file in files.items()}


def align_classes(splits: dict[str, LabeledSamples]) -> dict[str, LabeledSamples]:
    """The splits relabelled to one class list, the union of theirs (a split may lack a class).

    Numeric class names (the label values of list and JSON files) are ordered by value, others by name.
    Multi-label splits must already share one class list.
    """
    parts = list(splits.values())
    if all(p.class_names == parts[0].class_names for p in parts):
        return splits
    if any(p.multilabel for p in parts):
        raise DataError(
            "the splits' classes differ: " + "; ".join(f"{n}: {p.class_names}" for n, p in splits.items())
        )
    names = sorted({n for p in parts for n in p.class_names})
    if all(n.isdigit() for n in names):
        names.sort(key=int)
    return {
        name: dataclasses.replace(
            part,
            items=[
                dataclasses.replace(s, label=names.index(part.class_names[s.label]))  # type: ignore[index]
                for s in part.items
            ],
            class_names=names,
        )
        for name, part in splits.items()
    }


# ------------------------------------------------------------------------------------------- checking


def inspect_file(path: str) -> FileInfo:
    """Content hash, decoded size or the reason it cannot be decoded; the file is read once."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return FileInfo(None, None, f"cannot be read ({error.strerror or error})")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return FileInfo(digest, None, "is an empty (0-byte) file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return FileInfo(digest, image.size, None)
    except Image.DecompressionBombError as error:
        return FileInfo(digest, None, f"is too large to decode safely ({error})")
    except (OSError, SyntaxError, ValueError) as error:
        reason = "is truncated" if "truncated" in str(error) else f"is not a readable image ({error})"
        return FileInfo(digest, None, reason)


def inspect_files(paths: Iterable[str], workers: int = 8) -> dict[str, FileInfo]:
    """:func:`inspect_file` for every distinct path (threads: PIL and hashlib release the GIL)."""
    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(unique, pool.map(inspect_file, unique), strict=True))


def _ident(part: LabeledSamples, sample: Sample) -> str:
    """How a sample is named in the report: its normalised path, or ``source#row`` for an array row."""
    return os.path.normpath(sample.path) if sample.path else f"{part.source}#{sample.array_index}"


def inspect_rows(part: LabeledSamples) -> dict[str, FileInfo]:
    """:class:`FileInfo` of every array row of an in-memory split (``.npz``): content hash and size."""
    if part.arrays is None:
        return {}
    infos = {}
    for sample in part.items:
        if sample.path is None:
            row = np.ascontiguousarray(part.arrays[sample.array_index])
            digest = hashlib.sha256(str(row.shape).encode() + row.tobytes()).hexdigest()
            infos[_ident(part, sample)] = FileInfo(digest, (row.shape[1], row.shape[0]), None)
    return infos


def _label_names(samples: LabeledSamples, label: Any) -> tuple[str, ...]:
    if samples.multilabel:
        return tuple(n for n, v in zip(samples.class_names, label, strict=True) if v)
    return (samples.class_names[label],)


def _example(paths: Iterable[str]) -> str:
    shown = sorted(paths)
    more = f" (and {len(shown) - _SHOWN} more)" if len(shown) > _SHOWN else ""
    return ", ".join(shown[:_SHOWN]) + more


def _split_info(samples: LabeledSamples) -> dict[str, Any]:
    counts = dict(zip(samples.class_names, samples.class_counts(), strict=True))
    present = {k: v for k, v in counts.items() if v}
    smallest = min(present.values()) if present else 0
    largest = max(present.values()) if present else 0
    return {
        "images": len(samples),
        "classes": len(samples.class_names),
        "classes_present": len(present),
        "counts": counts,
        "balance": {
            "min": smallest,
            "max": largest,
            "ratio": round(largest / smallest, 2) if smallest else None,
        },
        "source": samples.source,
    }


def cross_split_duplicates(
    splits: dict[str, LabeledSamples], pairs: list[tuple[str, str]], infos: dict[str, FileInfo]
) -> list[Problem]:
    """Blocking problems: a file listed in both splits of a pair, or identical contents in both."""
    problems = []
    for a, b in pairs:
        paths_a = {_ident(splits[a], s) for s in splits[a].items}
        paths_b = {_ident(splits[b], s) for s in splits[b].items}
        shared = paths_a & paths_b
        if shared:
            problems.append(
                Problem(
                    "error",
                    "split_overlap",
                    f"{len(shared)} files are listed in both {a} and {b}: {_example(shared)}",
                    sorted(shared),
                )
            )
        by_digest: dict[str, list[str]] = defaultdict(list)
        for path in paths_a - shared:
            info = infos.get(path)
            if info and info.digest:
                by_digest[info.digest].append(path)
        pairs_found = [
            f"{os.path.basename(x)} ({a}) = {path} ({b})"
            for path in sorted(paths_b - shared)
            if (info := infos.get(path)) and info.digest in by_digest
            for x in by_digest[info.digest][:1]
        ]
        if pairs_found:
            problems.append(
                Problem(
                    "error",
                    "duplicate_across_splits",
                    f"{len(pairs_found)} files in {b} are identical to files in {a} (content hash): "
                    + "; ".join(pairs_found[:_SHOWN])
                    + (f" (and {len(pairs_found) - _SHOWN} more)" if len(pairs_found) > _SHOWN else ""),
                    pairs_found,
                )
            )
    return problems


def check_splits(layout: Layout, input_size: int | None = 224, workers: int = 8) -> DataReport:
    """Inspect every file of ``layout`` once and report (see the module docstring)."""
    files = [os.path.normpath(s.path) for part in layout.splits.values() for s in part.items if s.path]
    infos = inspect_files(files, workers)
    for part in layout.splits.values():
        infos.update(inspect_rows(part))
    problems: list[Problem] = []

    bad = {p: i.error for p, i in infos.items() if i.error}
    if bad:
        listing = "; ".join(f"{p} {reason}" for p, reason in sorted(bad.items())[:_SHOWN])
        more = f" (and {len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
        problems.append(
            Problem(
                "error", "unreadable", f"{len(bad)} images cannot be decoded: {listing}{more}", sorted(bad)
            )
        )
    problems += cross_split_duplicates(layout.splits, layout.pairs, infos)

    labels_by_digest: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    files_by_digest: dict[str, set[str]] = defaultdict(set)
    for part in layout.splits.values():
        for sample in part.items:
            info = infos.get(_ident(part, sample))
            if info and info.digest and not info.error:
                labels_by_digest[info.digest].add(_label_names(part, sample.label))
                files_by_digest[info.digest].add(_ident(part, sample))
    conflicting = [
        d for d, labels in labels_by_digest.items() if len(labels) > 1 and len(files_by_digest[d]) > 1
    ]
    if conflicting:
        groups = [" = ".join(sorted(files_by_digest[d])) for d in conflicting]
        problems.append(
            Problem(
                "warning",
                "duplicate_across_classes",
                f"{len(conflicting)} groups of identical files carry different labels: {_example(groups)}",
                groups,
            )
        )
    same_split = (
        [d for d, paths in files_by_digest.items() if len(paths) > 1 and d not in conflicting]
        if not layout.pairs
        else []
    )
    if same_split:
        groups = [" = ".join(sorted(files_by_digest[d])) for d in same_split]
        problems.append(
            Problem(
                "warning",
                "duplicate_files",
                f"{len(same_split)} groups of identical files; a random split can put copies on both sides: "
                f"{_example(groups)}",
                groups,
            )
        )

    if input_size:
        small = sorted(p for p, i in infos.items() if i.size and min(i.size) < input_size)
        if small:
            sizes = Counter(f"{infos[p].size[0]}x{infos[p].size[1]}" for p in small)  # type: ignore[index]
            problems.append(
                Problem(
                    "warning",
                    "smaller_than_input",
                    f"{len(small)} images are smaller than the model input {input_size}x{input_size} "
                    f"(they will be upscaled; sizes {dict(sizes.most_common(3))}): {_example(small)}",
                    small,
                )
            )

    for train, evaluated in layout.pairs:
        seen = {n for s in layout.splits[train].items for n in _label_names(layout.splits[train], s.label)}
        unseen = sorted(
            {
                n
                for s in layout.splits[evaluated].items
                for n in _label_names(layout.splits[evaluated], s.label)
            }
            - seen
        )
        if unseen:
            problems.append(
                Problem(
                    "warning",
                    "label_not_in_training",
                    f"labels {unseen[:10]}{' ...' if len(unseen) > 10 else ''} occur in {evaluated} but never in "
                    f"{train}: a model trained on {train} cannot predict them",
                    unseen,
                )
            )
    for name, part in layout.splits.items():
        if not len(part):
            problems.append(Problem("error", "empty_split", f"split {name} ({part.source}) has no images"))
    splits = {name: _split_info(part) for name, part in layout.splits.items()}
    return DataReport(kind=layout.kind, splits=splits, problems=problems)


# ------------------------------------------------------------------------------------------- training


def split_summary_line(split: FewShotSplit) -> str:
    """The one line training prints and writes first in ``data.txt``."""
    parts = []
    for name, part in (("train", split.train), ("val", split.val), ("test", split.test)):
        present = sum(1 for c in part.class_counts() if c)
        parts.append(f"{name} {len(part)} images ({present}/{part.num_classes} classes)")
    return "data: " + ", ".join(parts)


def _readable_digest(path: str) -> str | None:
    """SHA-256 of a file, or None when it cannot be read (the dataset names it when it loads it)."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def guard_duplicates(split: FewShotSplit, allow: bool) -> dict[str, str]:
    """Raise DataError when two of train/val/test share identical files, unless ``allow``.

    Only content hashes are needed (no decoding); they are returned (normalised path -> SHA-256) so the
    run's file record (``data.manifest.record_split``) does not read the files again. Files that do not
    exist are left to the dataset, which names them when it loads them.
    """
    parts = {"train": split.train, "val": split.val, "test": split.test}
    paths = sorted(
        {
            os.path.normpath(s.path)
            for p in parts.values()
            for s in p.items
            if s.path and os.path.isfile(s.path)
        }
    )
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=8) as pool:  # hashlib releases the GIL
        found = dict(zip(paths, pool.map(_readable_digest, paths), strict=True))
    digests = {path: digest for path, digest in found.items() if digest is not None}
    infos = {path: FileInfo(digest, None, None) for path, digest in digests.items()}
    problems = cross_split_duplicates(parts, [("train", "val"), ("train", "test"), ("val", "test")], infos)
    if problems and not allow:
        raise DataError(
            "; ".join(p.message for p in problems)
            + ". Remove the copies (promptvit data check PATH lists them all), or pass "
            "--data.allow-duplicates true to train anyway."
        )
    return digests
