"""Few-shot sampling and leak-free splits.

Two protocols are supported:

* MedFMC: the official ``*_K-shot_train_expE.txt`` files (or :func:`sample_medfmc_k_shot`, which
  re-implements the benchmark generator with a seed), validation = trainval minus train and minus the
  other images of the training studies (:func:`holdout_validation`), test = ``test_WithLabel.txt``; see
  :func:`load_medfmc_split`.
* Generic (any folder/CSV/npz): a seeded stratified test split, K images per class drawn from the
  rest, validation from what is left; see :func:`make_few_shot_split`.

Samples with a ``group`` (patient, study, slide, lesion) never straddle train, val and test
(docs/protocols-and-recipes.md, "Groups in your own data").

All sampling uses ``random.Random(seed)`` over sorted candidates, so a seed gives the same draw on
every machine and Python version.
"""

from __future__ import annotations

import os
import random
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from promptvit.data.errors import DataError, DataWarning
from promptvit.data.sources import (
    MEDFMC_CLASSES,
    MEDFMC_DATASETS,
    MEDFMC_SINGLE_LABEL,
    LabeledSamples,
    Sample,
    medfmc_group,
    medfmc_split_files,
    read_medfmc_list,
)


@dataclass
class FewShotSplit:
    """The three sets one few-shot run uses; ``val`` is disjoint from ``train`` by construction."""

    train: LabeledSamples
    val: LabeledSamples
    test: LabeledSamples

    def summary(self) -> str:
        """Three lines (train/val/test) for the run log."""
        return "\n".join(
            f"{name}: {part.summary()}"
            for name, part in (("train", self.train), ("val", self.val), ("test", self.test))
        )


def check_classifiable(samples: LabeledSamples) -> None:
    """A single-label data set needs two classes to train a classifier on; one class is a ``DataError``."""
    if not samples.multilabel and samples.num_classes < 2:
        raise DataError(
            f"{samples.source} has one class ({samples.class_names[0]!r}); a classifier needs at least two. "
            "Add a class (one sub-folder or label per class), or check the path and label column"
        )


def _check_k(k: int) -> None:
    if k < 1:
        raise DataError(f"k (shots per class) must be at least 1, got {k}")


def sample_k_shot(samples: LabeledSamples, k: int, seed: int) -> LabeledSamples:
    """Draw exactly ``k`` images per class (single-label), without replacement.

    Raises DataError naming every class with fewer than ``k`` images rather than silently
    training on an unbalanced set. The result keeps the input order.
    """
    _check_k(k)
    if samples.multilabel:
        raise DataError(
            f"{samples.source} is multi-label; use sample_medfmc_k_shot (K positives per class) instead"
        )
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples.items):
        by_class[sample.label].append(index)  # type: ignore[index]
    short = [
        f"'{name}' has {len(by_class[c])}"
        for c, name in enumerate(samples.class_names)
        if len(by_class[c]) < k
    ]
    if short:
        raise DataError(
            f"{samples.source}: {k}-shot needs {k} images per class but " + ", ".join(short) + ". Use a "
            "smaller k, add images, or drop the class."
        )
    rng = random.Random(seed)
    chosen = sorted(i for c in range(samples.num_classes) for i in rng.sample(by_class[c], k))
    return samples.subset([samples.items[i] for i in chosen], f"{samples.source} ({k}-shot, seed {seed})")


def _sample_groups_per_class(
    samples: LabeledSamples,
    k: int,
    seed: int,
    group_of: Callable[[Sample], str],
    unit: str,
) -> LabeledSamples:
    """For each class: pick ``k`` groups with a member in that class, keep all those members.

    This is the MedFMC generator's definition. With one group per image it is "K positive images
    per class" (chest); with study ids it is "K studies" (endo, colon). Images chosen for several
    classes appear several times, as in the official train lists.
    """
    rng = random.Random(seed)
    chosen: list[int] = []
    short = []
    for c, name in enumerate(samples.class_names):
        members = [i for i, s in enumerate(samples.items) if _in_class(s, c, samples.multilabel)]
        groups = sorted({group_of(samples.items[i]) for i in members})
        if len(groups) < k:
            short.append(f"'{name}' has {len(groups)}")
            continue
        picked = set(rng.sample(groups, k))
        chosen.extend(i for i in members if group_of(samples.items[i]) in picked)
    if short:
        raise DataError(
            f"{samples.source}: {k}-shot needs {k} {unit} per class but " + ", ".join(short) + ". Use a "
            "smaller k."
        )
    return samples.subset([samples.items[i] for i in chosen], f"{samples.source} ({k}-shot, seed {seed})")


def _in_class(sample: Sample, c: int, multilabel: bool) -> bool:
    return sample.label[c] == 1 if multilabel else sample.label == c  # type: ignore[index]


def _endo_study(sample: Sample) -> str:
    return medfmc_group("endo", sample.file_name)  # type: ignore[return-value]


def _colon_study(sample: Sample) -> str:
    return medfmc_group("colon", sample.file_name)  # type: ignore[return-value]


def _neojaundice_study(sample: Sample) -> str:
    # '0012-1.png': three photos per baby share the first four characters
    return medfmc_group("neojaundice", sample.file_name)  # type: ignore[return-value]


def study_of(sample: Sample, dataset: str | None) -> str | None:
    """MedFMC's study (endo), slide (colon) or baby (neojaundice) id of an image, read from its file name;
    None elsewhere."""
    return medfmc_group(dataset, sample.file_name) if dataset is not None else None


def sample_medfmc_k_shot(samples: LabeledSamples, k: int, seed: int, dataset: str | None) -> LabeledSamples:
    """MedFMC N-way K-shot (docs/protocols-and-recipes.md, "MedFMC few-shot sampling"), drawn from ``samples`` (normally ``trainval.txt``).

    * chest: per class, K images positive for it (an image may be drawn for several classes);
    * endo: per class, K studies (``file_name[:18]``) with a positive image, then all of those
      studies' images positive for the class;
    * colon: K positive and K negative slides (``file_name[:-9]``), then all their patches of
      that label;
    * neojaundice: the same with babies (``file_name[:4]``) instead of slides;
    * retino: K images per class (single-label);
    * ``None`` (other data): multi-label as chest; single-label as :func:`sample_k_shot`.
    """
    _check_k(k)
    if dataset is None:
        if not samples.multilabel:
            return sample_k_shot(samples, k, seed)
        return _sample_groups_per_class(samples, k, seed, lambda s: s.key, "positive images")
    if dataset not in MEDFMC_CLASSES:
        raise DataError(f"unknown MedFMC dataset '{dataset}'; expected one of {MEDFMC_DATASETS} or None")
    expected_multilabel = dataset not in MEDFMC_SINGLE_LABEL
    if samples.multilabel != expected_multilabel or samples.num_classes != len(MEDFMC_CLASSES[dataset]):
        raise DataError(
            f"{samples.source} ({samples.num_classes} classes, multilabel={samples.multilabel}) is not a "
            f"MedFMC '{dataset}' list; read it with read_medfmc_list(..., dataset='{dataset}')"
        )
    if dataset == "chest":
        return _sample_groups_per_class(samples, k, seed, lambda s: s.key, "positive images")
    if dataset == "endo":
        return _sample_groups_per_class(samples, k, seed, _endo_study, "studies")
    if dataset == "neojaundice":
        return _sample_groups_per_class(samples, k, seed, _neojaundice_study, "babies")
    if dataset == "retino":
        return sample_k_shot(samples, k, seed)
    return _sample_groups_per_class(samples, k, seed, _colon_study, "slides")


def _strata(samples: LabeledSamples) -> list[int]:
    """Stratum per item: the class (single-label) or the rarest positive class (multi-label).

    Stratifying multi-label data on its rarest positive class keeps every class represented on
    both sides; all-negative rows form their own stratum (index ``num_classes``).
    """
    if not samples.multilabel:
        return [s.label for s in samples.items]  # type: ignore[misc]
    counts = samples.class_counts()
    strata = []
    for sample in samples.items:
        positives = [c for c, v in enumerate(sample.label) if v]  # type: ignore[arg-type]
        strata.append(min(positives, key=lambda c: (counts[c], c)) if positives else samples.num_classes)
    return strata


def _stratum_name(samples: LabeledSamples, stratum: int) -> str:
    return samples.class_names[stratum] if stratum < samples.num_classes else "(all-negative)"


def _keys_by_stratum(
    samples: LabeledSamples, key: Callable[[Sample], str] = lambda s: s.key
) -> dict[int, list[str]]:
    """Distinct unit keys per stratum (first-seen order), so a unit can never straddle a split.

    A unit is a file (``key`` default; duplicates of it go together) or a group (``Sample.group_key``); a
    unit's stratum is the most common one among its items (ties: the first seen), which for a file is its own.
    """
    strata_of: dict[str, list[int]] = {}
    for sample, stratum in zip(samples.items, _strata(samples), strict=True):
        strata_of.setdefault(key(sample), []).append(stratum)
    keys_by_stratum: dict[int, list[str]] = defaultdict(list)
    for unit, strata in strata_of.items():  # dicts keep first-seen order
        keys_by_stratum[max(dict.fromkeys(strata), key=strata.count)].append(unit)
    return keys_by_stratum


def stratified_split(
    samples: LabeledSamples,
    *,
    test_fraction: float | None = None,
    test_per_class: int | None = None,
    seed: int,
) -> tuple[LabeledSamples, LabeledSamples]:
    """Split into disjoint (rest, test), stratified by class, seeded.

    Give ``test_fraction`` (each class contributes round(fraction * n), at least 1 and leaving at
    least 1) or ``test_per_class`` (single-label only: exactly that many per class). Items are
    split by file, so a file listed twice never ends up on both sides, or, where samples carry a
    ``group`` (patient, study, lesion), by group: the counts are then groups, each in the class most of
    its images have.
    """
    if (test_fraction is None) == (test_per_class is None):
        raise DataError("give exactly one of test_fraction and test_per_class")
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if test_per_class is not None:
        if samples.multilabel:
            raise DataError(f"{samples.source} is multi-label; use test_fraction instead of test_per_class")
        if test_per_class < 1:
            raise DataError(f"test_per_class must be at least 1, got {test_per_class}")
    keys_by_stratum = _keys_by_stratum(samples, lambda s: s.group_key)
    rng = random.Random(seed)
    test_keys: set[str] = set()
    problems = []
    for stratum in sorted(keys_by_stratum):
        keys = keys_by_stratum[stratum]
        if test_per_class is not None:
            n_test = test_per_class
        else:
            n_test = min(max(round(test_fraction * len(keys)), 1), len(keys) - 1)  # type: ignore[operator]
        if len(keys) < 2 or n_test >= len(keys):
            problems.append(f"'{_stratum_name(samples, stratum)}' has {len(keys)}")
            continue
        test_keys.update(rng.sample(keys, n_test))
    if problems:
        need = f"more than {test_per_class}" if test_per_class is not None else "at least 2"
        raise DataError(
            f"{samples.source}: a test split needs {need} images per class so that some remain for "
            "training, but " + ", ".join(problems) + ". Lower the test size or drop the class."
        )
    rest = [s for s in samples.items if s.group_key not in test_keys]
    test = [s for s in samples.items if s.group_key in test_keys]
    return (
        samples.subset(rest, f"{samples.source} (train pool, seed {seed})"),
        samples.subset(test, f"{samples.source} (test, seed {seed})"),
    )


def holdout_validation(trainval: LabeledSamples, train: LabeledSamples) -> LabeledSamples:
    """Validation set = ``trainval`` minus every file in ``train`` and every image of a training group.

    Replaces the official MedFMC chest/endo val files, which contain most of their own train
    images (the benchmark generator's exclusion never matched), so selecting on them would reward
    memorisation. Groups (``Sample.group``: MedFMC's endo studies, colon slides and NeoJaundice babies, a
    CSV's patient or lesion column) go whole: another image of a training study would score the model on
    what it has nearly seen (docs/protocols-and-recipes.md, "MedFMC model selection").
    """
    if trainval.class_names != train.class_names or trainval.multilabel != train.multilabel:
        raise DataError(
            f"{train.source} and {trainval.source} have different classes or label types; "
            "read both lists with the same reader and dataset"
        )
    train_keys = {s.key for s in train.items}
    trainval_keys = {s.key for s in trainval.items}
    strangers = sorted(os.path.basename(k) for k in train_keys - trainval_keys)
    if strangers:
        warnings.warn(
            f"{len(strangers)} training files are not in {trainval.source} (e.g. {strangers[:3]}); "
            "check that both lists come from the same dataset and image root",
            stacklevel=2,
        )
    train_groups = {s.group for s in train.items if s.group is not None}
    val = [s for s in trainval.items if s.key not in train_keys and s.group not in train_groups]
    return trainval.subset(val, f"{trainval.source} minus {train.source}")


def load_medfmc_split(
    root: str | os.PathLike[str], dataset: str, shots: int, exp: int, check_files: bool = True
) -> FewShotSplit:
    """Official MedFMC run: train = ``{K}-shot_train_exp{E}``, val = trainval - train, test = test_WithLabel.

    Without a train list (NeoJaundice, Retino), train is drawn from trainval by the benchmark's rule, seed = exp.
    """
    files = medfmc_split_files(root, dataset, shots, exp)
    trainval, test = (
        read_medfmc_list(path, dataset, files.image_root, check_files)
        for path in (files.trainval, files.test)
    )
    if files.train is None:
        train = sample_medfmc_k_shot(trainval, shots, exp, dataset)
    else:
        train = read_medfmc_list(files.train, dataset, files.image_root, check_files)
    return FewShotSplit(train=train, val=holdout_validation(trainval, train), test=test)


def cap_per_class(samples: LabeledSamples, cap: int, seed: int) -> LabeledSamples:
    """At most ``cap`` distinct files per class (rarest-positive stratum for multi-label), seeded; order kept.

    Used to keep per-epoch validation cheap when one class is frequent.
    """
    if cap < 1:
        raise DataError(f"the per-class cap must be at least 1, got {cap}")
    rng = random.Random(seed)
    kept = {
        key
        for _, keys in sorted(_keys_by_stratum(samples).items())
        for key in rng.sample(keys, min(cap, len(keys)))
    }
    return samples.subset(
        [s for s in samples.items if s.key in kept],
        f"{samples.source} (at most {cap} per class, seed {seed})",
    )


def make_few_shot_split(
    samples: LabeledSamples,
    k: int,
    seed: int,
    *,
    test_fraction: float | None = None,
    test_per_class: int | None = None,
    val_per_class: int | None = None,
) -> FewShotSplit:
    """Generic protocol: stratified test split, K-shot train from the rest, val from what remains.

    ``val_per_class`` caps validation per class (per rarest-positive stratum for multi-label) so
    that one frequent class does not make per-epoch validation slow; None keeps all the rest.
    """
    pool, test = stratified_split(
        samples, test_fraction=test_fraction, test_per_class=test_per_class, seed=seed
    )
    train = sample_medfmc_k_shot(pool, k, seed, dataset=None)
    val = holdout_validation(pool, train)
    if val_per_class is not None:
        val = cap_per_class(val, val_per_class, seed + 1)
    return FewShotSplit(
        train=train, val=val.subset(val.items, f"{samples.source} (val, seed {seed})"), test=test
    )


def warn_untrained_classes(split: FewShotSplit) -> list[str]:
    """Warn (``DataWarning``) about classes that have evaluation images but no training image; returns them.

    Such a class can never be predicted correctly, so its evaluation scores are meaningless.
    """
    trained = {c for c, n in enumerate(split.train.class_counts()) if n}
    untrained = [
        split.train.class_names[c]
        for part in (split.val, split.test)
        for c, n in enumerate(part.class_counts())
        if n and c not in trained and c < len(split.train.class_names)
    ]
    untrained = sorted(set(untrained))
    if untrained:
        warnings.warn(
            f"{split.train.source}: classes {untrained[:10]} appear only in the validation/test split, "
            "never in training; their scores are meaningless. Add training images or drop the classes "
            "(data.classes)",
            DataWarning,
            stacklevel=2,
        )
    return untrained
