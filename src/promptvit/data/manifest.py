"""The exact files of a run's splits, with content hashes, so a later evaluation scores the same images.

``record_split`` lists every sample of train/val/test (path, label; SHA-256 of the evaluated val and test
files); ``recorded_samples`` turns a recorded part back into samples and refuses, naming the files, when
any of them changed or vanished since, instead of silently scoring a different set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from promptvit.data.errors import DataError
from promptvit.data.fewshot import FewShotSplit
from promptvit.data.sources import LabeledSamples, Sample
from promptvit.io import file_sha256

SPLIT_FILES = "split_files.json"
_HASHED_PARTS = ("val", "test")  # evaluated parts; train lists paths only (it can be large and is not scored)
_MAX_LISTED = 5


def record_split(split: FewShotSplit, digests: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """JSON-ready listing of the split's files; ``None`` for array-backed data (.npz, digits).

    ``digests`` (normalised path -> SHA-256, as ``data.check.guard_duplicates`` returns them) saves
    reading files whose hash is already known.
    """
    known = digests or {}

    def sha256(path: str) -> str:
        return known.get(os.path.normpath(path)) or file_sha256(path)

    parts = {"train": split.train, "val": split.val, "test": split.test}
    if any(s.path is None for part in parts.values() for s in part.items):
        return None
    record: dict[str, Any] = {"format_version": 1}
    for name, part in parts.items():
        record[name] = {
            "source": part.source,
            "class_names": part.class_names,
            "multilabel": part.multilabel,
            "files": [
                {
                    "path": os.path.abspath(s.path),  # type: ignore[arg-type]
                    "label": list(s.label) if isinstance(s.label, tuple) else s.label,
                    **({"sha256": sha256(s.path)} if name in _HASHED_PARTS else {}),  # type: ignore[arg-type]
                }
                for s in part.items
            ],
        }
    return record


def _listed(paths: list[str]) -> str:
    more = f" (and {len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else ""
    return ", ".join(paths[:_MAX_LISTED]) + more


def recorded_samples(path: str | os.PathLike[str], part: str) -> LabeledSamples:
    """The samples of ``part`` recorded in ``path``; ``DataError`` if any file changed or vanished."""
    path = Path(path)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))[part]
        files = entry["files"]
        items = [
            Sample(path=f["path"], label=tuple(f["label"]) if isinstance(f["label"], list) else f["label"])
            for f in files
        ]
        samples = LabeledSamples(items, list(entry["class_names"]), bool(entry["multilabel"]), str(path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is damaged ({error!r}); evaluate with --data instead") from None
    vanished = [f["path"] for f in files if not os.path.isfile(f["path"])]
    changed = [
        f["path"]
        for f in files
        if f["path"] not in vanished and "sha256" in f and file_sha256(f["path"]) != f["sha256"]
    ]
    if vanished or changed:
        problems = []
        if vanished:
            problems.append(f"{len(vanished)} vanished: {_listed(vanished)}")
        if changed:
            problems.append(f"{len(changed)} changed: {_listed(changed)}")
        raise DataError(
            f"the {part} files recorded in {path} are no longer as they were at training time "
            f"({'; '.join(problems)}); restore them, or evaluate on purpose on the data as it is now with --data"
        )
    return samples
