"""``DataSpec``: where a run's images are and how its split is drawn, and the samples and split it names.

The ``data`` section of a run config (``promptvit train --data ...``, sweep configs). :func:`make_split` is
the split a run trains, selects and tests on; :func:`evaluation_samples` what ``promptvit eval --data``
scores; :func:`sample_groups` the units the bootstrap resamples. Like the rest of ``promptvit.data`` it knows
no model, so protocols and the command line use it without the run pipeline.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from promptvit.data.check import align_classes, detect_layout, read_layout
from promptvit.data.errors import DataError
from promptvit.data.fewshot import (
    FewShotSplit,
    cap_per_class,
    check_classifiable,
    holdout_validation,
    load_medfmc_split,
    make_few_shot_split,
    sample_k_shot,
    sample_medfmc_k_shot,
    stratified_split,
    study_of,
)
from promptvit.data.sources import (
    MEDFMC_CLASSES,
    LabeledSamples,
    digits_demo,
    medfmc_split_files,
    read_csv,
    read_image_folder,
    read_medfmc_list,
    read_npz,
)
from promptvit.data.split_files import is_fewshot_folder, read_fewshot_folder
from promptvit.validation import FINITE

#: what ``data.kind`` (``--data-kind``) may be; 'auto' detects it from the files at ``data.path``
DATA_KINDS = (
    "auto",
    "folder",
    "csv",
    "npz",
    "fewshot",
    "lists",
    "splits",
    "vtab",
    "fgvc",
    "medfmc",
    "digits",
)
#: kinds whose data comes with its own train/val/test split (``eval --data`` scores their test split)
SPLIT_KINDS = ("npz", "fewshot", "lists", "splits", "vtab", "fgvc", "medfmc")
#: named splits of the fixed-split layouts (``promptvit.data.check.read_layout``): train, val, test
_FIXED_SPLITS = {
    "lists": ("train", "val", "test"),
    "splits": ("train", "val", "test"),
    "fgvc": ("train", "val", "test"),
    "vtab": ("train800", "val200", "test"),
}



class DataSpec(BaseModel):
    """Where the images are and how the few-shot split is drawn."""

    model_config = FINITE

    # 'list' and 'json' are single split files, used by the VTAB-1k and FGVC protocols' fixed sources
    kind: Literal[DATA_KINDS + ("list", "json")] = Field(  # type: ignore[valid-type]
        "auto", description="auto (detected from data.path), " + ", ".join(DATA_KINDS[1:])
    )
    path: str | None = Field(None, description="image folder, CSV, .npz, split folder or MedFMC root")
    image_root: str | None = None
    file_column: str = "file"
    label_column: str = "label"
    label_columns: list[str] | None = None
    file_suffix: str = ""
    group_column: str | None = Field(
        None,
        description="CSV: column naming each image's patient, lesion or study; splits keep a group on one side",
    )
    dataset: str | None = Field(
        None,
        description="MedFMC data set (chest, colon, endo, neojaundice, retino), or the name of a folder "
        "written by `promptvit data fewshot --format medfmc`",
    )
    exp: int = Field(1, ge=1, description="MedFMC experiment split (1..5), or the exp of a fewshot folder")
    shots: int | None = Field(None, ge=1, description="K images (or MedFMC studies) per class; None = all")
    classes: list[str] | None = Field(None, description="use only these classes, in this order")
    test_fraction: float | None = Field(0.3, gt=0, lt=1)
    val_per_class: int | None = Field(20, ge=1)
    skip_corrupt: bool = False
    allow_duplicates: bool = Field(
        False, description="train even when identical image files sit in two of train/val/test"
    )
    train_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="RandomResizedCrop area range for training"
    )
    hflip: bool = Field(True, description="random horizontal flips for training")
    augment: bool = Field(
        True,
        description="random augmentation for training; false uses the eval transform (required by cache_prefix)",
    )

    @field_validator("train_scale")
    @classmethod
    def _crop_area_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"[{low}, {high}] is not an area range: RandomResizedCrop needs 0 < min <= max <= 1, e.g. [0.08, 1]"
            )
        return value

    @field_validator("classes", "label_columns", mode="before")
    @classmethod
    def _names_from_numbers(cls, value: Any) -> Any:
        # `--data.classes [0,1]` reads as YAML numbers; folder and column names are text.
        if isinstance(value, list):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        return value

    @model_validator(mode="after")
    def _needs_path(self) -> DataSpec:
        if self.kind != "digits" and not self.path:
            raise ValueError(f"data.path is required when data.kind is {self.kind} (--data PATH)")
        if self.classes is not None and not self.classes:
            raise ValueError("data.classes is empty; leave it out to use every class, or list the classes")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes repeats a class: {self.classes}")
        if self.kind == "medfmc" and self.classes:
            raise ValueError(
                "data.classes does not apply to MedFMC, whose classes are fixed by the benchmark"
            )
        if self.kind == "medfmc" and self.dataset is None:
            raise ValueError("data.kind=medfmc needs data.dataset (chest, colon, endo, neojaundice, retino)")
        return self


def _fewshot_location(path: Path, dataset: str | None) -> Path | None:
    """A ``data fewshot`` folder named by ``path`` (or ``path/dataset``) whose name is ``dataset``, else None."""
    for candidate in (path, path / dataset) if dataset else (path,):
        if is_fewshot_folder(candidate):
            folder, _ = read_fewshot_folder(candidate)
            if dataset is None or folder.name == dataset:
                return candidate
    return None


def resolve_data_spec(spec: DataSpec) -> DataSpec:
    """``spec`` with ``kind: auto`` replaced by the layout found at ``data.path``, and what a split folder
    fixes filled in (the K and exp of a ``{K}-shot/seed{S}`` folder, the K of a fewshot folder with one K),
    so that the recorded config says what the run used. MedFMC names outside the benchmark's five are looked
    up as ``promptvit data fewshot --format medfmc`` folders."""
    update: dict[str, Any] = {}
    kind = spec.kind
    if kind == "auto":
        kind = detect_layout(spec.path)  # type: ignore[arg-type]
        if kind == "medfmc":  # a MedFMC data set folder (chest/ ...): the root is its parent
            base = Path(spec.path)  # type: ignore[arg-type]
            name = spec.dataset or base.name.lower()
            update.update(path=str(base.parent), dataset=name)
        update["kind"] = kind
    if kind == "medfmc" and spec.dataset not in MEDFMC_CLASSES:
        found = _fewshot_location(Path(spec.path), spec.dataset)  # type: ignore[arg-type]
        if found is None:
            raise DataError(
                f"MedFMC data set '{spec.dataset}' is not one of {list(MEDFMC_CLASSES)}, and {spec.path} holds no "
                f"folder of that name written by `promptvit data fewshot --format medfmc --name {spec.dataset}`"
            )
        kind = "fewshot"
        update.update(kind=kind, path=str(found))
    if kind == "fewshot":
        folder, draw = read_fewshot_folder(update.get("path", spec.path))
        shots, exp = draw if draw is not None else (spec.shots, spec.exp)
        if draw is not None and spec.shots not in (None, shots):
            raise DataError(f"{spec.path} is the {shots}-shot draw, but data.shots is {spec.shots}")
        if shots is None and len(folder.shots) == 1:
            shots = folder.shots[0]
        if shots is None:
            raise DataError(
                f"{folder.root} holds K in {folder.shots}: choose one with --shots (and --data.exp 1.."
                f"{len(folder.seeds)} for the draw)"
            )
        update.update(shots=shots, exp=exp)
    return spec.model_copy(update=update) if update else spec


def load_samples(spec: DataSpec) -> LabeledSamples:
    """Read the labelled pool a generic split is drawn from (folder, CSV, the digits); other kinds come with
    their own splits (:func:`make_split`, :func:`evaluation_samples`)."""
    if spec.kind == "digits":
        return digits_demo()
    if spec.kind == "folder":
        return read_image_folder(spec.path)
    if spec.kind == "csv":
        return read_csv(
            spec.path,
            image_root=spec.image_root,
            file_column=spec.file_column,
            label_column=spec.label_column,
            label_columns=spec.label_columns,
            file_suffix=spec.file_suffix,
            group_column=spec.group_column,
        )
    raise DataError(
        f"data.kind {spec.kind} has its own train/val/test splits; use make_split or evaluation_samples"
    )


def evaluation_samples(spec: DataSpec) -> LabeledSamples:
    """What ``promptvit eval --data`` scores: the test split of data that has one, else every image."""
    spec = resolve_data_spec(spec)
    if spec.kind == "npz":
        return _select(read_npz(spec.path, "test"), spec)
    if spec.kind == "fewshot":
        return _select(read_fewshot_folder(spec.path)[0].test(), spec)
    if spec.kind == "medfmc":
        files = medfmc_split_files(spec.path, spec.dataset, spec.shots or 1, spec.exp, need_train=False)
        return read_medfmc_list(files.test, spec.dataset, files.image_root)
    if spec.kind in _FIXED_SPLITS:
        return _fixed_split(spec, seed=0).test
    return _select(load_samples(spec), spec)


def _select(samples: LabeledSamples, spec: DataSpec) -> LabeledSamples:
    return samples.select_classes(spec.classes) if spec.classes else samples


def _fixed_split(spec: DataSpec, seed: int) -> FewShotSplit:
    """Train/val/test of a layout that has them (a ``train.txt``/``val.txt``/``test.txt`` folder, ``train/
    val/ test/`` class folders, a VTAB-1k task, an FGVC data set); K per class drawn from train with
    ``data.shots``, validation held out of train when the layout has none."""
    layout = read_layout(spec.path, spec.kind)  # type: ignore[arg-type]
    names = _FIXED_SPLITS[spec.kind]
    missing = [n for n in (names[0], names[2]) if n not in layout.splits]
    if missing:
        raise DataError(f"{spec.path}: no {' or '.join(missing)} split in this {spec.kind} layout")
    parts = align_classes({n: layout.splits[n] for n in names if n in layout.splits})
    train, test = _select(parts[names[0]], spec), _select(parts[names[2]], spec)
    val = _select(parts[names[1]], spec) if names[1] in parts else None
    if spec.shots:
        drawn = sample_medfmc_k_shot(train, spec.shots, seed, dataset=None)
        if val is None:
            val = holdout_validation(train, drawn)
            val = cap_per_class(val, spec.val_per_class, seed + 1) if spec.val_per_class and len(val) else val
        train = drawn
    elif val is None:
        train, val = stratified_split(train, test_fraction=0.1, seed=seed + 1)
    return FewShotSplit(train=train, val=val, test=test)


def make_split(spec: DataSpec, seed: int) -> FewShotSplit:
    """Train/val/test for one run; validation is always disjoint from training."""
    spec = resolve_data_spec(spec)
    if spec.kind == "medfmc":
        if spec.shots is None:
            raise DataError("data.kind=medfmc needs data.shots (1, 5, 10): --shots K")
        split = load_medfmc_split(spec.path, spec.dataset, spec.shots, spec.exp)
    elif spec.kind == "fewshot":
        split = read_fewshot_folder(spec.path)[0].split(spec.shots, spec.exp)  # type: ignore[arg-type]
        split = FewShotSplit(*(_select(part, spec) for part in (split.train, split.val, split.test)))
    elif spec.kind in _FIXED_SPLITS:
        split = _fixed_split(spec, seed)
    elif spec.kind == "npz":
        train, val, test = (_select(read_npz(spec.path, part), spec) for part in ("train", "val", "test"))
        if spec.shots:
            train = (
                sample_k_shot(train, spec.shots, seed)
                if not train.multilabel
                else sample_medfmc_k_shot(train, spec.shots, seed, dataset=None)
            )
        split = FewShotSplit(train=train, val=val, test=test)
    else:
        samples = _select(load_samples(spec), spec)
        check_classifiable(samples)
        if spec.shots:
            return make_few_shot_split(
                samples, spec.shots, seed, test_fraction=spec.test_fraction, val_per_class=spec.val_per_class
            )
        # All data: a stratified test split, then 10% of the rest for validation.
        pool, test = stratified_split(samples, test_fraction=spec.test_fraction, seed=seed)
        train, val = stratified_split(pool, test_fraction=0.1, seed=seed + 1)
        return FewShotSplit(train=train, val=val, test=test)
    check_classifiable(split.train)
    return split


#: CSV columns that name the patient/lesion/study an image belongs to, in order of preference
GROUP_COLUMNS = ("patient_id", "lesion_id", "study_id")


def sample_groups(samples: LabeledSamples, data: DataSpec | None) -> tuple[list[str] | None, str]:
    """Group ids of ``samples`` for the bootstrap, and the rule that found them.

    MedFMC endo/colon/NeoJaundice: the study/slide/baby id in the file name. Samples that all carry a
    ``group`` (a CSV read with ``data.group_column``): those. Else a CSV source with a ``patient_id``,
    ``lesion_id`` or ``study_id`` column (HAM10000 has ``lesion_id``): that column. Otherwise every image is
    its own unit.
    """
    kind = getattr(data, "kind", None)
    if kind == "medfmc" and data.dataset in ("endo", "colon", "neojaundice"):
        return [study_of(s, data.dataset) for s in samples.items], f"MedFMC {data.dataset} group (file name)"
    groups = [s.group for s in samples.items]
    if groups and all(g is not None for g in groups):
        return groups, f"CSV column {getattr(data, 'group_column', None) or 'group'}"
    if kind == "csv" and data.path and Path(data.path).is_file():
        with open(data.path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            column = next((c for c in GROUP_COLUMNS if c in (reader.fieldnames or [])), None)
            if column is not None:
                by_file = {
                    os.path.basename(row[data.file_column] + data.file_suffix): row[column] for row in reader
                }
                groups = [by_file.get(os.path.basename(s.path or "")) for s in samples.items]
                if all(g for g in groups):
                    return groups, f"CSV column {column}"
    return None, "images (no group ids in this data)"
