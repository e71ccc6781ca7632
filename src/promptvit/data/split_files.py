"""Write K-shot split files for any labelled folder or CSV, in the MedFMC or the VTAB-1k list format.

One seeded stratified test split is drawn once (``test_fraction`` per class, seed ``seeds[0]``); the rest
is the pool (MedFMC's ``trainval``). For every K and every seed, K images per class (K positives per class
for multi-label data) are drawn from the pool; validation is the rest of the pool (at most
``val_per_class`` per class), so it never overlaps training.

* ``medfmc``: ``trainval.txt``, ``test_WithLabel.txt`` and, per K and exp (the i-th seed is exp i),
  ``{name}_{K}-shot_train_exp{i}.txt`` and ``{name}_{K}-shot_val_exp{i}.txt``. Lines are
  ``file label`` (single-label) or ``file 0,1,0,...`` (multi-label, as MedFMC's chest lists).
* ``vtab``: per K and seed a folder ``{K}-shot/seed{S}/`` with ``train.txt``, ``val.txt``,
  ``trainval.txt`` and ``test.txt``, one ``relative/path label`` per line (single-label only).

File names are relative to the folder the list sits in (vtab) or to the image root printed in
``README.txt`` (medfmc, as MedFMC's lists are relative to ``images/``); ``classes.txt`` holds one class name
per line, in label order. Existing files are never overwritten: the output folder must be new or empty.

Samples with a ``group`` (a CSV read with ``group_column``: patient, lesion, study) keep each group in one of
test, train and val: the test split draws whole groups, and validation leaves out every group a training
image belongs to.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from promptvit.data.errors import DataError
from promptvit.data.fewshot import cap_per_class, holdout_validation, sample_medfmc_k_shot, stratified_split
from promptvit.data.sources import LabeledSamples, Sample

FORMATS = ("medfmc", "vtab")


def _label_text(sample: Sample, multilabel: bool) -> str:
    return ",".join(map(str, sample.label)) if multilabel else str(sample.label)  # type: ignore[arg-type]


def _write_list(path: Path, samples: LabeledSamples, relative_to: Path) -> None:
    lines = [
        f"{os.path.relpath(s.path, relative_to)} {_label_text(s, samples.multilabel)}"  # type: ignore[type-var]
        for s in samples.items
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as handle:  # 'x': never over an existing file
        handle.write("\n".join(lines) + "\n")


def _image_root(samples: LabeledSamples) -> Path:
    paths = [s.path for s in samples.items if s.path]
    if len(paths) != len(samples.items):
        raise DataError(
            f"{samples.source}: in-memory arrays have no files to list; use a folder or CSV data set"
        )
    return Path(os.path.commonpath([os.path.dirname(p) for p in paths]))


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
    """Write the split files (see the module docstring); return the paths written."""
    if fmt not in FORMATS:
        raise DataError(f"unknown split-file format '{fmt}'; expected one of {', '.join(FORMATS)}")
    if fmt == "vtab" and samples.multilabel:
        raise DataError(
            f"{samples.source} is multi-label; the VTAB list format holds one label per line: use medfmc"
        )
    if not shots or not seeds:
        raise DataError("give at least one K (--shots) and one seed (--seeds)")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"{target} exists and is not an empty folder; give a new output folder")
    pool, test = stratified_split(samples, test_fraction=test_fraction, seed=seeds[0])
    draws = {}
    for k in shots:
        for seed in seeds:
            train = sample_medfmc_k_shot(pool, k, seed, dataset=None)
            val = holdout_validation(pool, train)
            if val_per_class is not None and len(val):
                val = cap_per_class(val, val_per_class, seed + 1)
            draws[k, seed] = (train, val)
    target.mkdir(parents=True, exist_ok=True)
    written = []

    def write(path: Path, part: LabeledSamples, relative_to: Path) -> None:
        _write_list(path, part, relative_to)
        written.append(path)

    if fmt == "medfmc":
        root = _image_root(samples)
        write(target / "trainval.txt", pool, root)
        write(target / "test_WithLabel.txt", test, root)
        for (k, seed), (train, val) in draws.items():
            exp = list(seeds).index(seed) + 1
            write(target / f"{name}_{k}-shot_train_exp{exp}.txt", train, root)
            write(target / f"{name}_{k}-shot_val_exp{exp}.txt", val, root)
        readme = (
            f"MedFMC-format split files for {samples.source}.\nFile names are relative to {root}.\n"
            + "".join(f"exp{i + 1}: seed {s}\n" for i, s in enumerate(seeds))
        )
    else:
        for (k, seed), (train, val) in draws.items():
            folder = target / f"{k}-shot" / f"seed{seed}"
            write(folder / "train.txt", train, folder)
            write(folder / "val.txt", val, folder)
            write(folder / "trainval.txt", train.subset([*train.items, *val.items]), folder)
            write(folder / "test.txt", test, folder)
        readme = f"VTAB-format split files for {samples.source}; paths are relative to each list's folder.\n"
    with open(target / "classes.txt", "x", encoding="utf-8") as handle:
        handle.write("\n".join(samples.class_names) + "\n")
    grouped = any(s.group is not None for s in samples.items)
    with open(target / "README.txt", "x", encoding="utf-8") as handle:
        handle.write(
            readme + f"test: {test_fraction:g} per class (seed {seeds[0]}); K in {list(shots)}; "
            f"val: the rest of the pool, at most {val_per_class} per class.\n"
            + ("groups: test takes whole groups; val leaves out every training image's group.\n" if grouped else "")
        )
    return written
