"""K-shot split files for any labelled folder or CSV (``promptvit data fewshot``), and reading them back.

Writing: one seeded stratified test split is drawn once (``test_fraction`` per class, seed ``seeds[0]``); the
rest is the pool (MedFMC's ``trainval``). For every K and every seed, K images per class (K positives per
class for multi-label data) are drawn from the pool; validation is the rest of the pool (at most
``val_per_class`` per class), so it never overlaps training. The i-th seed is exp i.

* ``medfmc``: ``trainval.txt``, ``test_WithLabel.txt`` and, per K and exp, ``{name}_{K}-shot_train_exp{i}.txt``
  and ``{name}_{K}-shot_val_exp{i}.txt``. Lines are ``file label`` (single-label) or ``file 0,1,0,...``
  (multi-label, as MedFMC's chest lists); file names are relative to the image root.
* ``vtab``: per K and seed a folder ``{K}-shot/seed{S}/`` with ``train.txt``, ``val.txt``, ``trainval.txt``
  and ``test.txt``, one ``relative/path label`` per line, paths relative to that folder (single-label only).

Both formats also write ``fewshot.json`` (:data:`MANIFEST`: format, name, classes, image root, K, seeds,
test fraction), from which :func:`read_fewshot_folder` reads everything back: ``promptvit data check`` checks
every split it lists, and ``promptvit train --data FOLDER`` (``data.kind: fewshot``) trains on one (K, exp)
draw of it, or on the draw of a ``{K}-shot/seed{S}/`` folder given directly. ``classes.txt`` (one class name
per line, in label order) and ``README.txt`` are for people.

Samples with a ``group`` (a CSV read with ``group_column``: patient, lesion, study) keep each group in one of
test, train and val: the test split draws whole groups, and validation leaves out every group a training
image belongs to.

Nothing is written unless every file can be: a data set name that is not a plain file name, a repeated K or
seed, a single-class data set and an image whose relative path cannot sit on one line of a list file (a
newline, leading or trailing spaces) are refused first. The output folder must be new or empty, and outside
the images (:func:`promptvit.io.output_folder`), and every file is written atomically with
:func:`promptvit.io.atomic_write_text`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptvit.data.errors import DataError
from promptvit.data.fewshot import (
    FewShotSplit,
    cap_per_class,
    check_classifiable,
    holdout_validation,
    sample_medfmc_k_shot,
    stratified_split,
)
from promptvit.data.sources import LabeledSamples, Sample, read_index_list
from promptvit.io import atomic_write_text, output_folder

FORMATS = ("medfmc", "vtab")
MANIFEST = "fewshot.json"
VTAB_LISTS = ("train", "val", "trainval", "test")
_NAME = re.compile(r"\w[\w.-]{0,99}")


def _label_text(sample: Sample, multilabel: bool) -> str:
    return ",".join(map(str, sample.label)) if multilabel else str(sample.label)  # type: ignore[arg-type]


def _list_text(samples: LabeledSamples, relative_to: Path) -> str:
    lines = []
    for sample in samples.items:
        name = os.path.relpath(sample.path, relative_to)  # type: ignore[type-var]
        if name != name.strip() or any(c in name for c in "\n\r\t\v\f\x1c\x1d\x1e\x85\u2028\u2029"):
            raise DataError(
                f"{sample.path!r}: a list file holds one image per line, and this file name has a line break, "
                "tab or leading/trailing space; rename the file"
            )
        lines.append(f"{name} {_label_text(sample, samples.multilabel)}")
    return "\n".join(lines) + "\n"


def _image_root(samples: LabeledSamples) -> Path:
    paths = [s.path for s in samples.items if s.path]
    if len(paths) != len(samples.items):
        raise DataError(
            f"{samples.source}: in-memory arrays have no files to list; use a folder or CSV data set"
        )
    return Path(os.path.commonpath([os.path.abspath(os.path.dirname(p)) for p in paths]))


def _distinct(values: Sequence[int], option: str) -> None:
    repeated = sorted({v for v in values if list(values).count(v) > 1})
    if repeated:
        raise DataError(f"{option} lists {repeated} more than once; give each value once")


def check_data_set_name(name: str) -> str:
    """A data set name becomes part of file names: letters, digits, '_', '-', '.' only, not starting with '.'."""
    if not _NAME.fullmatch(name):
        raise DataError(
            f"data set name {name!r} must be a plain name (letters, digits, '_', '-', '.'; no '/', spaces or "
            "leading '.'), since it becomes part of the file names inside --out"
        )
    return name


def write_fewshot_files(
    samples: LabeledSamples,
    out: str | os.PathLike[str],
    *,
    shots: Sequence[int],
    seeds: Sequence[int],
    fmt: str = "medfmc",
    name: str = "data",
    test_fraction: float = 0.3,
    val_per_class: int | None = 20,
) -> list[Path]:
    """Write the split files (see the module docstring); return the list files written."""
    if fmt not in FORMATS:
        raise DataError(f"unknown split-file format '{fmt}'; expected one of {', '.join(FORMATS)}")
    if fmt == "vtab" and samples.multilabel:
        raise DataError(
            f"{samples.source} is multi-label; the VTAB list format holds one label per line: use medfmc"
        )
    if not shots or not seeds:
        raise DataError("give at least one K (--shots) and one seed (--seeds)")
    _distinct(shots, "--shots")
    _distinct(seeds, "--seeds")
    check_data_set_name(name)
    check_classifiable(samples)
    target = Path(out)
    images = [Path(s.path).parent for s in samples.items if s.path]
    # a new or empty folder, outside the images (``io.output_folder``); claimed once the draws succeed
    inputs = [os.path.commonpath(images)] if images else []
    output_folder(target, "fewshot", inputs=inputs, reuse=False, create=False)
    pool, test = stratified_split(samples, test_fraction=test_fraction, seed=seeds[0])
    root = _image_root(samples)
    files: dict[Path, str] = {}  # every list, rendered before anything is written
    for k in shots:
        for exp, seed in enumerate(seeds, start=1):
            train = sample_medfmc_k_shot(pool, k, seed, dataset=None)
            val = holdout_validation(pool, train)
            if val_per_class is not None and len(val):
                val = cap_per_class(val, val_per_class, seed + 1)
            if fmt == "medfmc":
                files[target / f"{name}_{k}-shot_train_exp{exp}.txt"] = _list_text(train, root)
                files[target / f"{name}_{k}-shot_val_exp{exp}.txt"] = _list_text(val, root)
            else:
                folder = target / f"{k}-shot" / f"seed{seed}"
                trainval = train.subset([*train.items, *val.items])
                for part, listed in zip(VTAB_LISTS, (train, val, trainval, test), strict=True):
                    files[folder / f"{part}.txt"] = _list_text(listed, folder)
    if fmt == "medfmc":
        files = {
            target / "trainval.txt": _list_text(pool, root),
            target / "test_WithLabel.txt": _list_text(test, root),
            **files,
        }
        where = f"File names are relative to {root}.\n" + "".join(
            f"exp{i}: seed {s}\n" for i, s in enumerate(seeds, start=1)
        )
    else:
        where = "Paths are relative to each list's folder.\n"
    grouped = any(s.group is not None for s in samples.items)
    manifest: dict[str, Any] = {
        "format_version": 1,
        "written_by": "promptvit data fewshot",
        "format": fmt,
        "name": name,
        "source": samples.source,
        "class_names": samples.class_names,
        "multilabel": samples.multilabel,
        "image_root": str(root) if fmt == "medfmc" else None,
        "shots": list(shots),
        "seeds": list(seeds),
        "test_fraction": test_fraction,
        "test_seed": seeds[0],
        "val_per_class": val_per_class,
    }
    if grouped:  # the lists hold no group: the manifest keeps it, so what is read back splits and resamples alike
        manifest["groups"] = {os.path.abspath(s.path): s.group for s in samples.items}  # type: ignore[arg-type]
    output_folder(target, "fewshot", inputs=inputs, reuse=False)
    for path, text in files.items():
        atomic_write_text(path, text)
    atomic_write_text(target / "classes.txt", "\n".join(samples.class_names) + "\n")
    atomic_write_text(target / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    atomic_write_text(
        target / "README.txt",
        f"{fmt.upper() if fmt == 'vtab' else 'MedFMC'}-format split files for {samples.source}.\n{where}"
        f"test: {test_fraction:g} per class (seed {seeds[0]}); K in {list(shots)}; "
        f"val: the rest of the pool, at most {val_per_class} per class.\n"
        + ("groups: test takes whole groups; val leaves out every training image's group.\n" if grouped else "")
        + f"Check them with `promptvit data check {target}`; train on one draw with "
        f"`promptvit train --data {target} --shots K --data.exp E` (exp E = the E-th seed).\n",
    )
    return list(files)


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class FewShotFolder:
    """A folder written by :func:`write_fewshot_files`, as its manifest describes it."""

    root: Path
    format: str
    name: str
    class_names: list[str]
    multilabel: bool
    shots: list[int]
    seeds: list[int]
    image_root: Path | None
    #: absolute image path -> group (patient, lesion, study), when the data set had groups
    groups: dict[str, str] | None = None

    def _list(self, path: Path, check_files: bool = True) -> LabeledSamples:
        root = self.image_root if self.format == "medfmc" else path.parent
        listed = read_index_list(path, root, self.class_names, self.multilabel, check_files)  # type: ignore[arg-type]
        if not self.groups:
            return listed
        groups = self.groups
        return listed.subset(
            [dataclasses.replace(s, group=groups.get(os.path.abspath(s.path))) for s in listed.items]  # type: ignore[arg-type]
        )

    def draw_files(self, shots: int, exp: int) -> dict[str, Path]:
        """The train/val/test (and trainval) list files of the draw (K, exp); ``DataError`` naming what is missing."""
        if shots not in self.shots or not 1 <= exp <= len(self.seeds):
            raise DataError(
                f"{self.root} holds K in {self.shots} and exps 1..{len(self.seeds)} (seeds {self.seeds}); "
                f"{shots}-shot exp {exp} is not among them. Choose --shots and --data.exp from those"
            )
        if self.format == "medfmc":
            files = {
                "train": self.root / f"{self.name}_{shots}-shot_train_exp{exp}.txt",
                "val": self.root / f"{self.name}_{shots}-shot_val_exp{exp}.txt",
                "test": self.root / "test_WithLabel.txt",
            }
        else:
            folder = self.root / f"{shots}-shot" / f"seed{self.seeds[exp - 1]}"
            files = {part: folder / f"{part}.txt" for part in VTAB_LISTS}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise DataError(f"{self.root}: split files missing: {', '.join(missing)}; write the folder again")
        return files

    def split(self, shots: int, exp: int) -> FewShotSplit:
        """The draw (K, exp): train, its validation list and the shared test list."""
        files = self.draw_files(shots, exp)
        return FewShotSplit(**{part: self._list(files[part]) for part in ("train", "val", "test")})

    def test(self) -> LabeledSamples:
        """The one test split every draw shares."""
        if self.format == "medfmc":
            return self._list(self.root / "test_WithLabel.txt")
        return self._list(self.draw_files(self.shots[0], 1)["test"])

    def all_splits(self) -> tuple[dict[str, LabeledSamples], list[tuple[str, str]]]:
        """Every list of the folder by name, and the (training, evaluated) pairs that must not share images."""
        splits: dict[str, LabeledSamples] = {}
        pairs: list[tuple[str, str]] = []
        if self.format == "medfmc":
            splits["trainval"] = self._list(self.root / "trainval.txt")
            splits["test"] = self.test()
            pairs.append(("trainval", "test"))
        for k in self.shots:
            for exp in range(1, len(self.seeds) + 1):
                files = self.draw_files(k, exp)
                label = (
                    f"{k}-shot exp{exp}" if self.format == "medfmc" else f"{k}-shot/seed{self.seeds[exp - 1]}"
                )
                for part, path in files.items():
                    if part != "test" or self.format == "vtab":
                        splits[f"{label} {part}"] = self._list(path)
                test = f"{label} test" if self.format == "vtab" else "test"
                pairs += [
                    (f"{label} train", f"{label} val"),
                    (f"{label} train", test),
                    (f"{label} val", test),
                ]
                if self.format == "vtab":
                    pairs.append((f"{label} trainval", test))
        return splits, pairs


def _manifest_of(path: Path) -> tuple[Path, tuple[int, int] | None] | None:
    """(folder holding the manifest, the (K, seed) of a ``{K}-shot/seed{S}`` folder given directly) or None."""
    if (path / MANIFEST).is_file():
        return path, None
    match_k = re.fullmatch(r"(\d+)-shot", path.parent.name)
    match_s = re.fullmatch(r"seed(-?\d+)", path.name)
    if match_k and match_s and (path.parent.parent / MANIFEST).is_file():
        return path.parent.parent, (int(match_k.group(1)), int(match_s.group(1)))
    return None


def is_fewshot_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``promptvit data fewshot``, or one of its ``{K}-shot/seed{S}/``."""
    return Path(path).is_dir() and _manifest_of(Path(path)) is not None


def read_fewshot_folder(path: str | os.PathLike[str]) -> tuple[FewShotFolder, tuple[int, int] | None]:
    """The folder's manifest, and (K, exp) when ``path`` is one ``{K}-shot/seed{S}/`` draw of it."""
    found = _manifest_of(Path(path))
    if found is None:
        raise DataError(f"{path} is not a folder written by `promptvit data fewshot` (no {MANIFEST})")
    root, draw = found
    manifest_path = root / MANIFEST
    try:
        data: Any = json.loads(manifest_path.read_text(encoding="utf-8"))
        folder = FewShotFolder(
            root=root,
            format=str(data["format"]),
            name=check_data_set_name(str(data["name"])),
            class_names=[str(n) for n in data["class_names"]],
            multilabel=bool(data["multilabel"]),
            shots=[int(k) for k in data["shots"]],
            seeds=[int(s) for s in data["seeds"]],
            image_root=Path(data["image_root"]) if data.get("image_root") else None,
            groups={str(k): str(v) for k, v in data["groups"].items()} if data.get("groups") else None,
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{manifest_path} is damaged ({error!r}); write the split files again") from None
    if folder.format not in FORMATS or (folder.format == "medfmc" and folder.image_root is None):
        raise DataError(f"{manifest_path} is damaged (format {folder.format!r}); write the split files again")
    if draw is not None:
        k, seed = draw
        if seed not in folder.seeds:
            raise DataError(f"{path}: seed {seed} is not among the folder's seeds {folder.seeds}")
        draw = (k, folder.seeds.index(seed) + 1)
    return folder, draw
