"""Readers that turn image folders, CSV files, MedFMC lists and ``.npz`` arrays into labelled samples.

Every reader returns the same :class:`LabeledSamples` structure, so few-shot sampling, splitting
and the dataset class never need to know where the labels came from. Readers only parse and
check; they never open images (see :mod:`promptvit.data.dataset` for that).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptvit.data.errors import DataError, DataWarning

Label = int | tuple[int, ...]
"""Single-label: the class index. Multi-label: a 0/1 tuple with one entry per class."""

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)

MEDFMC_DATASETS = ("chest", "endo", "colon", "neojaundice", "retino")
#: one class index per line ('name.png 3'); chest and endo lines carry 0/1 vectors
MEDFMC_SINGLE_LABEL = ("colon", "neojaundice", "retino")
#: folder names of the few-shot baseline's release, accepted beside promptvit's names
MEDFMC_FOLDERS = {"neojaundice": "NeoJaundice", "retino": "Retino"}

MEDFMC_CLASSES: dict[str, tuple[str, ...]] = {
    "chest": (
        "pleural_effusion",
        "nodule",
        "pneumonia",
        "cardiomegaly",
        "hilar_enlargement",
        "fracture_old",
        "fibrosis",
        "aortic_calcification",
        "tortuous_aorta",
        "thickened_pleura",
        "TB",
        "pneumothorax",
        "emphysema",
        "atelectasis",
        "calcification",
        "pulmonary_edema",
        "increased_lung_markings",
        "elevated_diaphragm",
        "consolidation",
    ),
    "endo": ("ulcer", "erosion", "polyp", "tumor"),
    # The benchmark code spells class 0 'negtive'; we use the correct spelling. Only the display
    # name differs: the label index (0 = negative, 1 = positive) is the one in the list files.
    "colon": ("negative", "positive"),
    # The few-shot baseline's public lists give class indices only, so the names are the indices.
    "neojaundice": ("0", "1"),
    "retino": ("0", "1", "2", "3", "4"),
}

_MAX_LISTED = 5  # how many offending lines an error message quotes before summarising


@dataclass(frozen=True)
class Sample:
    """One labelled image: a file (``path``) or a row of an in-memory array (``array_index``).

    ``line`` is the 1-based line of the list/CSV file the sample came from, so that errors found
    later (for example an unreadable image) can still point at the line to fix. ``group`` names the patient,
    study, slide or lesion the image belongs to (MedFMC's rule per data set, a CSV ``group_column``): splits
    keep a group's images on one side and the bootstrap resamples whole groups. None: the image stands alone.
    """

    path: str | None
    label: Label
    array_index: int | None = None
    line: int | None = None
    group: str | None = None

    @property
    def key(self) -> str:
        """Identity used to compare samples across lists (train vs trainval, train vs test)."""
        if self.path is not None:
            return os.path.normpath(self.path)
        return f"#array:{self.array_index}"

    @property
    def group_key(self) -> str:
        """What splits keep together: the group, or the image itself when it has none."""
        return f"#group:{self.group}" if self.group is not None else self.key

    @property
    def file_name(self) -> str:
        """The bare file name; MedFMC study ids are slices of it."""
        if self.path is None:
            raise DataError(f"sample #{self.array_index} is an in-memory array and has no file name")
        return os.path.basename(self.path)


@dataclass
class LabeledSamples:
    """A list of samples plus what is needed to interpret their labels.

    ``arrays`` holds the pixels of array-backed sources (MedMNIST ``.npz``, the digits demo),
    indexed by ``Sample.array_index``; it is shared, never copied, by subsets.
    """

    items: list[Sample]
    class_names: list[str]
    multilabel: bool
    source: str
    arrays: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        num_classes = len(self.class_names)
        if num_classes == 0:
            raise DataError(f"{self.source}: no classes defined")
        for sample in self.items:
            if self.multilabel:
                ok = (
                    isinstance(sample.label, tuple)
                    and len(sample.label) == num_classes
                    and all(v in (0, 1) for v in sample.label)
                )
            else:
                ok = isinstance(sample.label, int) and 0 <= sample.label < num_classes
            if not ok:
                kind = f"a 0/1 tuple of length {num_classes}" if self.multilabel else "a class index"
                raise DataError(
                    f"{self.source}{_at(sample.line)}: label {sample.label!r} is not {kind} "
                    f"for {num_classes} classes"
                )
            if sample.path is None:
                if self.arrays is None or sample.array_index is None:
                    raise DataError(f"{self.source}: a sample has neither a path nor an array row")
                if not 0 <= sample.array_index < len(self.arrays):
                    raise DataError(
                        f"{self.source}: array index {sample.array_index} out of range "
                        f"for {len(self.arrays)} arrays"
                    )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, items: Sequence[Sample], source: str | None = None) -> LabeledSamples:
        """Same classes and arrays, different items (used for splits and few-shot draws)."""
        return dataclasses.replace(self, items=list(items), source=source or self.source)

    def select_classes(self, names: Sequence[str]) -> LabeledSamples:
        """Keep only the given classes (in that order), relabelled; multi-label rows keep their columns."""
        unknown = [n for n in names if n not in self.class_names]
        if unknown or not names:
            raise DataError(f"{self.source}: unknown classes {unknown}; the classes are {self.class_names}")
        index = [self.class_names.index(n) for n in names]
        if self.multilabel:
            items = [dataclasses.replace(s, label=tuple(s.label[i] for i in index)) for s in self.items]
        else:
            new_label = {old: new for new, old in enumerate(index)}
            items = [
                dataclasses.replace(s, label=new_label[s.label]) for s in self.items if s.label in new_label
            ]
        return dataclasses.replace(self, items=items, class_names=list(names))

    def class_counts(self) -> list[int]:
        """Images per class (single-label) or positives per class (multi-label)."""
        counts = [0] * self.num_classes
        for sample in self.items:
            if self.multilabel:
                for c, v in enumerate(sample.label):  # type: ignore[arg-type]
                    counts[c] += v
            else:
                counts[sample.label] += 1  # type: ignore[index]
        return counts

    @property
    def num_all_negative(self) -> int:
        """Multi-label rows with no positive class: real normal images, kept but worth reporting."""
        if not self.multilabel:
            return 0
        return sum(1 for s in self.items if not any(s.label))  # type: ignore[arg-type]

    @property
    def num_duplicates(self) -> int:
        """Items whose file already appeared earlier (MedFMC chest train lists legitimately have some)."""
        return len(self.items) - len({s.key for s in self.items})

    def summary(self) -> str:
        """One line for logs and run folders."""
        counts = ", ".join(f"{n}={c}" for n, c in zip(self.class_names, self.class_counts(), strict=True))
        kind = "multi-label" if self.multilabel else "single-label"
        text = f"{self.source}: {len(self)} images, {self.num_classes} classes ({kind}; {counts})"
        if self.multilabel:
            text += f", {self.num_all_negative} all-negative"
        if self.num_duplicates:
            text += f", {self.num_duplicates} duplicated entries"
        return text


def _at(line: int | None) -> str:
    return f", line {line}" if line is not None else ""


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} not found: {path}. Check the path (relative paths are from {os.getcwd()}).")
    if not path.is_file():
        raise DataError(f"{what} is not a file: {path}")


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} not found: {path}. Check the path (relative paths are from {os.getcwd()}).")
    if not path.is_dir():
        raise DataError(f"{what} is not a folder: {path}")


def _check_files_exist(items: Sequence[Sample], source: str, image_root: Path) -> None:
    missing = [s for s in items if s.path is not None and not os.path.isfile(s.path)]
    if missing:
        shown = "; ".join(f"line {s.line}: {os.path.basename(s.path)!r}" for s in missing[:_MAX_LISTED])
        more = f" (and {len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
        raise DataError(
            f"{source}: {len(missing)} of {len(items)} listed images do not exist under {image_root}: "
            f"{shown}{more}. Fix the image root (image_root=...) or the file names, "
            "or pass check_files=False to only parse the list."
        )


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 list file (a BOM is dropped); a file in another encoding is a ``DataError``.

    Lines end at ``\\n`` only (``\\r\\n`` accepted), not at the other characters ``str.splitlines`` breaks on.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); re-save it as UTF-8"
        ) from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def _int_like(text: str) -> int | None:
    """'3' and '3.0' are class indices (ISIC ships '1.0'); anything else is a name."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def read_image_folder(root: str | os.PathLike[str]) -> LabeledSamples:
    """Read ``root/<class>/**/<image>``: one class per sub-folder, class names sorted.

    Sorting fixes the class index independently of the file system's listing order, so the same
    folder always yields the same label mapping.
    """
    root_path = Path(root)
    _require_dir(root_path, "image folder")
    class_dirs = sorted(p for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p.name for p in root_path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = (
            f" It holds {len(loose)} loose images: move them into one sub-folder per class." if loose else ""
        )
        raise DataError(f"image folder {root_path} has no class sub-folders.{hint}")
    items: list[Sample] = []
    empty: list[str] = []
    for index, class_dir in enumerate(class_dirs):
        files = sorted(
            os.path.join(dirpath, name)
            for dirpath, dirnames, filenames in os.walk(class_dir)
            for name in filenames
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")
        )
        if not files:
            empty.append(class_dir.name)
        items.extend(Sample(path=f, label=index) for f in files)
    if empty:
        raise DataError(
            f"image folder {root_path}: class sub-folder(s) {empty} contain no images "
            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}). Add images or remove the folder(s)."
        )
    warn_case_variants(str(root_path), [p.name for p in class_dirs])
    return LabeledSamples(
        items=items, class_names=[p.name for p in class_dirs], multilabel=False, source=str(root_path)
    )


def read_csv(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    file_column: str = "file",
    label_column: str = "label",
    label_columns: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    file_suffix: str = "",
    check_files: bool = True,
    group_column: str | None = None,
) -> LabeledSamples:
    """Read a CSV with a header: ``file,label`` (single-label) or one 0/1 column per class.

    Single-label labels may be class names or integer indices. Without ``class_names`` the classes
    are the sorted unique names (or ``'0'..'max'`` for integer labels); pass ``class_names`` to fix
    the order. With ``label_columns`` the task is multi-label and those columns are the classes
    (``class_names`` then only renames them). ``file_suffix`` is appended to every file name
    (ISIC lists ids without '.jpg'). Images are looked up under ``image_root`` (default: the CSV's
    folder). A file listed twice is an error, since it would leak between splits. ``group_column`` names a
    column (patient, lesion, study id) whose value becomes each image's ``Sample.group``.
    """
    csv_path = Path(path)
    _require_file(csv_path, "CSV file")
    root = Path(image_root) if image_root is not None else csv_path.parent
    try:
        samples = _read_csv_rows(
            csv_path, root, file_column, label_column, label_columns, class_names, file_suffix, check_files
        )
        return samples if group_column is None else _with_csv_groups(samples, csv_path, group_column)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{csv_path} is not UTF-8 text ({error.reason} at byte {error.start}); re-save it as UTF-8"
        ) from None


def _read_csv_rows(
    csv_path: Path,
    root: Path,
    file_column: str,
    label_column: str,
    label_columns: Sequence[str] | None,
    class_names: Sequence[str] | None,
    file_suffix: str,
    check_files: bool,
) -> LabeledSamples:
    source = str(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise DataError(f"{source} is empty; expected a header line such as 'file,label'")
        wanted = [file_column, *(label_columns if label_columns is not None else [label_column])]
        absent = [c for c in wanted if c not in header]
        if absent:
            raise DataError(
                f"{source}, line 1: column(s) {absent} not in the header {header}. "
                "Set file_column / label_column / label_columns to the names used in the file."
            )
        if len(set(header)) != len(header):
            raise DataError(f"{source}, line 1: repeated column names in the header {header}")
        rows: list[tuple[int, str, list[str]]] = []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{source}, line {reader.line_num}: {len(row)} fields but the header has "
                    f"{len(header)} ({','.join(header)}). Quote fields that contain commas."
                )
            name = row[header.index(file_column)].strip()
            if not name:
                raise DataError(f"{source}, line {reader.line_num}: empty '{file_column}' field")
            rows.append((reader.line_num, name, row))
    if not rows:
        raise DataError(f"{source} has a header but no data rows")

    first_line: dict[str, tuple[int, str]] = {}
    for line, name, _ in rows:
        same = os.path.normpath(name)  # 'c0/x.png' and './c0/x.png' are one file
        if same in first_line:
            earlier, spelled = first_line[same]
            as_written = "" if spelled == name else f" (written '{spelled}' there)"
            raise DataError(
                f"{source}, line {line}: '{name}' is already listed at line {earlier}{as_written}. "
                "Remove the duplicate row (a repeated image would leak between train and test)."
            )
        first_line[same] = (line, name)

    if label_columns is not None:
        names, labels = _multilabel_csv_labels(source, header, rows, list(label_columns), class_names)
        multilabel = True
    else:
        raw = [(line, row[header.index(label_column)].strip()) for line, _, row in rows]
        names, single = _single_label_csv_labels(source, raw, class_names)
        labels = list(single)
        multilabel = False
    items = [
        Sample(path=str(root / (name + file_suffix)), label=label, line=line)
        for (line, name, _), label in zip(rows, labels, strict=True)
    ]
    if check_files:
        _check_files_exist(items, source, root)
    return LabeledSamples(items=items, class_names=names, multilabel=multilabel, source=source)


def _with_csv_groups(samples: LabeledSamples, csv_path: Path, group_column: str) -> LabeledSamples:
    """``samples`` with ``Sample.group`` read from ``group_column`` (matched by line number)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if group_column not in header:
            raise DataError(
                f"{csv_path}, line 1: group column '{group_column}' not in the header {header}. "
                "Set group_column to the column naming each image's patient, lesion or study."
            )
        position = header.index(group_column)
        groups = {}
        for row in reader:
            if len(row) == len(header):
                groups[reader.line_num] = row[position].strip()
    items = []
    for sample in samples.items:
        group = groups.get(sample.line or -1, "")
        if not group:
            raise DataError(
                f"{csv_path}, line {sample.line}: empty '{group_column}' field; every image needs its group "
                "(patient, lesion or study id), or leave group_column unset"
            )
        items.append(dataclasses.replace(sample, group=group))
    return samples.subset(items)


def medfmc_group(dataset: str, file_name: str) -> str | None:
    """The MedFMC group of an image from its file name (docs/protocols-and-recipes.md, "MedFMC model
    selection"): endo's study (the first 18 characters), colon's slide (all but the last 9), NeoJaundice's baby
    (the first 4); None for chest and retino, whose images stand alone."""
    if dataset == "endo":
        return file_name[:18]
    if dataset == "colon":
        return file_name[:-9]
    if dataset == "neojaundice":
        return file_name[:4]
    return None


MAX_CLASSES = 10_000
"""More classes than this from a label column is a typo (a label ``1e8``), not a task."""
_MISSING_LABELS = frozenset({"", "nan", "na", "n/a", "null", "none", "?"})


def _normalise_labels(source: str, raw: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The one rule for single-label CSV labels (docs/bad-inputs.md, "CSV labels").

    Whitespace is stripped; an empty or missing-value label (NaN, NA, null, None, ?) is an error, since it is
    not a class; a label that reads as a whole number ('1', '1.0', '01', '1e0') is that number, written
    '1'. Spellings merged this way are reported in a ``DataWarning``.
    """
    out = []
    spellings: dict[str, set[str]] = {}
    for line, text in raw:
        text = text.strip()
        if text.lower() in _MISSING_LABELS:
            raise DataError(
                f"{source}, line {line}: the label is missing ({text!r}); a missing value is not a class. "
                "Fill it in or remove the row"
            )
        index = _int_like(text)
        if index is not None:
            spellings.setdefault(str(index), set()).add(text)
            text = str(index)
        out.append((line, text))
    merged = {k: sorted(v) for k, v in spellings.items() if len(v) > 1}
    if merged:
        warnings.warn(
            f"{source}: numeric labels written differently were read as one class: "
            + "; ".join(f"{v} -> '{k}'" for k, v in sorted(merged.items())[:_MAX_LISTED]),
            DataWarning,
            stacklevel=3,
        )
    return out


def warn_case_variants(source: str, names: Sequence[str]) -> None:
    """``DataWarning`` when class names differ only in case or surrounding spaces ('cat', 'Cat', 'CAT').

    They stay separate classes (a data set may mean them so), but they are usually one class spelled
    differently: fix the labels, or pass ``class_names`` to state the classes.
    """
    spellings: dict[str, list[str]] = {}
    for name in names:
        spellings.setdefault(name.strip().casefold(), []).append(name)
    clashes = [sorted(v) for v in spellings.values() if len(v) > 1]
    if clashes:
        warnings.warn(
            f"{source}: {len(clashes)} group(s) of class names differ only in case or spaces and are kept as "
            f"separate classes: {'; '.join(' / '.join(map(repr, c)) for c in clashes[:_MAX_LISTED])}. "
            "If they are one class, write the labels the same way",
            DataWarning,
            stacklevel=3,
        )


def _warn_singletons(source: str, names: list[str], labels: list[int]) -> None:
    counts = [0] * len(names)
    for label in labels:
        counts[label] += 1
    single = [n for n, c in zip(names, counts, strict=True) if c == 1]
    if single:
        warnings.warn(
            f"{source}: {len(single)} class(es) have a single image ({single[:_MAX_LISTED]}): too few to "
            "train and test on; check for typos in the labels",
            DataWarning,
            stacklevel=3,
        )


def _single_label_csv_labels(
    source: str, raw: list[tuple[int, str]], class_names: Sequence[str] | None
) -> tuple[list[str], list[int]]:
    raw = _normalise_labels(source, raw)
    if class_names is None:
        names, labels = _labels_without_names(source, raw)
        _warn_singletons(source, names, labels)
        return names, labels
    names = list(class_names)
    if len(set(names)) != len(names):
        raise DataError(f"class_names for {source} repeat a name: {names}")
    lookup = {n: i for i, n in enumerate(names)}
    labels = []
    for line, text in raw:
        if text in lookup:
            labels.append(lookup[text])
            continue
        index = _int_like(text)
        if index is None:
            raise DataError(
                f"{source}, line {line}: unknown class '{text}'. Known classes: {names}. "
                "Fix the label or add the class to class_names."
            )
        if not 0 <= index < len(names):
            raise DataError(
                f"{source}, line {line}: label {index} out of range for {len(names)} classes "
                f"(valid: 0..{len(names) - 1}). Fix the label or the class_names list."
            )
        labels.append(index)
    return names, labels


def _labels_without_names(source: str, raw: list[tuple[int, str]]) -> tuple[list[str], list[int]]:
    """Whole-number labels are indices 0..max, every one used; otherwise the sorted distinct labels."""
    indices = [_int_like(text) for _, text in raw]
    if all(i is not None for i in indices):
        for (line, text), index in zip(raw, indices, strict=True):
            if index < 0:  # type: ignore[operator]
                raise DataError(f"{source}, line {line}: negative class index {text}")
        top = max(indices)  # type: ignore[type-var]
        unused = sorted(set(range(min(top + 1, MAX_CLASSES + 1))) - set(indices))  # type: ignore[operator, arg-type]
        if top >= MAX_CLASSES or unused:
            line = next(line for (line, _), i in zip(raw, indices, strict=True) if i == top)
            raise DataError(
                f"{source}, line {line}: label {top} makes {top + 1:,} classes"  # type: ignore[operator]
                + (
                    f", but {len(unused):,} of the indices 0..{top} are never used ({unused[:_MAX_LISTED]})"
                    if unused
                    else f" (more than {MAX_CLASSES:,})"
                )
                + ". A typo? Integer labels must be the class indices 0..N-1; fix the label, or pass "
                "class_names to fix the classes"
            )
        return [str(i) for i in range(top + 1)], indices  # type: ignore[operator, return-value]
    names = sorted({text for _, text in raw})
    warn_case_variants(source, names)
    if len(names) > MAX_CLASSES:
        raise DataError(
            f"{source}: {len(names):,} distinct labels (more than {MAX_CLASSES:,} classes); is the label column "
            "right? Set label_column to the column holding the classes"
        )
    lookup = {n: i for i, n in enumerate(names)}
    return names, [lookup[text] for _, text in raw]


def _multilabel_csv_labels(
    source: str,
    header: list[str],
    rows: list[tuple[int, str, list[str]]],
    label_columns: list[str],
    class_names: Sequence[str] | None,
) -> tuple[list[str], list[tuple[int, ...]]]:
    if not label_columns:
        raise DataError(f"label_columns for {source} is empty; list the 0/1 class columns")
    names = list(class_names) if class_names is not None else list(label_columns)
    if len(names) != len(label_columns):
        raise DataError(
            f"{source}: {len(names)} class_names for {len(label_columns)} label_columns; give one name per column"
        )
    positions = [header.index(c) for c in label_columns]
    labels = []
    for line, _, row in rows:
        values = []
        for column, pos in zip(label_columns, positions, strict=True):
            value = _int_like(row[pos].strip())
            if value not in (0, 1):
                raise DataError(
                    f"{source}, line {line}: column '{column}' is {row[pos]!r}; multi-label columns must be 0 or 1"
                )
            values.append(value)
        labels.append(tuple(values))
    return names, labels  # type: ignore[return-value]


def parse_medfmc_line(line: str, dataset: str) -> tuple[str, Label]:
    """Split one MedFMC list line into (file name, label), as the benchmark's loaders do.

    chest: ``name l1,...,l19``; endo: ``name a b c d``; colon: ``name with spaces.png y``. We split
    on the last whitespace run(s) instead of fixed slices: identical on well-formed lines, but a
    malformed line gives a clear error instead of a silently wrong label.
    """
    if dataset not in MEDFMC_CLASSES:
        raise DataError(f"unknown MedFMC dataset '{dataset}'; expected one of {MEDFMC_DATASETS}")
    text = line.strip()
    num_classes = len(MEDFMC_CLASSES[dataset])
    if dataset == "chest":
        parts = text.rsplit(maxsplit=1)
        fields = parts[1].split(",") if len(parts) == 2 else []
        expected = f"'name.png' then {num_classes} comma-separated 0/1 labels"
    elif dataset == "endo":
        parts = text.rsplit(maxsplit=num_classes)
        fields = parts[1:]
        expected = f"'name.png' then {num_classes} space-separated 0/1 labels"
    else:
        parts = text.rsplit(maxsplit=1)
        fields = parts[1:]
        labels = "0 or 1" if num_classes == 2 else f"0..{num_classes - 1}"
        expected = f"'file name.png' then one label {labels}"
    single = dataset in MEDFMC_SINGLE_LABEL
    allowed = [str(c) for c in range(num_classes)] if single else ["0", "1"]
    want = 1 if single else num_classes
    if len(parts) < 2 or len(fields) != want or not all(f in allowed for f in fields):
        raise DataError(f"cannot parse {text!r}: expected {expected}")
    values = tuple(int(f) for f in fields)
    return parts[0], values[0] if single else values


def read_medfmc_list(
    path: str | os.PathLike[str],
    dataset: str,
    image_root: str | os.PathLike[str],
    check_files: bool = True,
) -> LabeledSamples:
    """Read a MedFMC split file (``*_K-shot_train_expE.txt``, ``trainval.txt``, ``test_WithLabel.txt``).

    Repeated file names are kept, as the official loader keeps them: the chest few-shot train
    files list an image once per class it was drawn for (see ``LabeledSamples.num_duplicates``).
    """
    list_path = Path(path)
    _require_file(list_path, f"MedFMC {dataset} list")
    if dataset not in MEDFMC_CLASSES:
        raise DataError(f"unknown MedFMC dataset '{dataset}'; expected one of {MEDFMC_DATASETS}")
    root = Path(image_root)
    source = str(list_path)
    items = []
    for number, line in enumerate(read_text_lines(list_path), start=1):
        if line.strip():
            try:
                name, label = parse_medfmc_line(line, dataset)
            except DataError as error:
                raise DataError(f"{source}, line {number}: {error}. Is this a '{dataset}' list?") from None
            group = medfmc_group(dataset, os.path.basename(name))
            items.append(Sample(path=str(root / name), label=label, line=number, group=group))
    if not items:
        raise DataError(f"{source} is empty")
    if check_files:
        _require_dir(root, f"MedFMC {dataset} image folder")
        _check_files_exist(items, source, root)
    return LabeledSamples(
        items=items,
        class_names=list(MEDFMC_CLASSES[dataset]),
        multilabel=dataset not in MEDFMC_SINGLE_LABEL,
        source=source,
    )


def read_index_list(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    class_names: Sequence[str],
    multilabel: bool,
    check_files: bool = True,
) -> LabeledSamples:
    """Read a list of ``file label`` lines whose labels index ``class_names``: ``name.png 2``, or for
    multi-label ``name.png 0,1,0`` (MedFMC's chest style); the file name may hold spaces.

    What ``promptvit data fewshot`` writes in both formats (``promptvit.data.split_files``).
    """
    list_path = Path(path)
    _require_file(list_path, "list file")
    source, root, count = str(list_path), Path(image_root), len(class_names)
    expected = (
        f"'name.png' then {count} comma-separated 0/1 labels"
        if multilabel
        else f"'name.png' then one class index 0..{count - 1}"
    )
    items = []
    for number, line in enumerate(read_text_lines(list_path), start=1):
        text = line.strip()
        if not text:
            continue
        parts = text.rsplit(maxsplit=1)
        fields = parts[1].split(",") if len(parts) == 2 else []
        ok = all(f.isascii() and f.isdigit() for f in fields) and len(fields) == (count if multilabel else 1)
        values = [int(f) for f in fields] if ok else []
        if not ok or not all(0 <= v < (2 if multilabel else count) for v in values):
            raise DataError(f"{source}, line {number}: cannot parse {text!r}; expected {expected}")
        label: Label = tuple(values) if multilabel else values[0]
        items.append(Sample(path=str(root / parts[0]), label=label, line=number))
    if not items:
        raise DataError(f"{source} lists no images")
    if check_files:
        _check_files_exist(items, source, root)
    return LabeledSamples(items=items, class_names=list(class_names), multilabel=multilabel, source=source)


@dataclass(frozen=True)
class MedFMCFiles:
    """Where one (dataset, K, exp) configuration of MedFMC lives on disk.

    ``val`` is None when the official val file is absent: it is not needed, because the chest and
    endo val files overlap their train files and ``holdout_validation`` replaces them. ``train`` is None
    for NeoJaundice and Retino when no ``{K}-shot_train_exp{E}`` list exists: their baseline publishes only
    the pool and the test list, so the K-shot set is drawn from the pool (seed = exp).
    """

    train: Path | None
    val: Path | None
    test: Path
    trainval: Path
    image_root: Path


def medfmc_split_files(
    root: str | os.PathLike[str], dataset: str, shots: int, exp: int, *, need_train: bool = True
) -> MedFMCFiles:
    """Resolve ``{root}/{dataset}/{dataset}_{K}-shot_{train,val}_exp{E}.txt`` and the shared files
    (``need_train=False``: only the shared ones, for evaluating on the test list)."""
    if dataset not in MEDFMC_CLASSES:
        raise DataError(f"unknown MedFMC dataset '{dataset}'; expected one of {MEDFMC_DATASETS}")
    if shots < 1 or exp < 1:
        raise DataError(f"shots and exp must be positive (got shots={shots}, exp={exp})")
    base = Path(root) / dataset
    if not base.is_dir() and dataset in MEDFMC_FOLDERS:
        base = Path(root) / MEDFMC_FOLDERS[dataset]

    def first(*names: str) -> Path:
        return next((base / n for n in names if (base / n).is_file()), base / names[0])

    drawn = dataset in MEDFMC_FOLDERS  # no official K-shot lists: drawn from the pool when absent
    files = MedFMCFiles(
        train=base / f"{dataset}_{shots}-shot_train_exp{exp}.txt",
        val=base / f"{dataset}_{shots}-shot_val_exp{exp}.txt",
        test=first("test_WithLabel.txt", "test.txt") if drawn else base / "test_WithLabel.txt",
        trainval=first("trainval.txt", "fewshot-pool.txt") if drawn else base / "trainval.txt",
        image_root=base / "images",
    )
    if (drawn or not need_train) and not files.train.is_file():  # type: ignore[union-attr]
        files = dataclasses.replace(files, train=None)
    required = [p for p in (files.train, files.test, files.trainval) if p is not None]
    missing = [str(p) for p in required if not p.is_file()]
    if not files.image_root.is_dir():
        missing.append(f"{files.image_root}/ (folder)")
    if missing:
        expected = (
            f"{Path(root)}/{MEDFMC_FOLDERS[dataset]}/ with images/, fewshot-pool.txt (or trainval.txt) and "
            "test.txt (or test_WithLabel.txt), as the MedFMC few-shot baseline ships them"
            if drawn
            else f"the benchmark layout {Path(root)}/<chest|colon|endo>/ with images/ and the split .txt files "
            "(the official K is 1, 5 or 10 and exp 1..5)"
        )
        raise DataError(
            f"MedFMC {dataset} {shots}-shot exp{exp}: missing " + ", ".join(missing) + f". Expected {expected}."
        )
    if files.val is not None and not files.val.is_file():
        files = dataclasses.replace(files, val=None)
    return files


NPZ_SPLITS = ("train", "val", "test")


def npz_split_names(path: str | os.PathLike[str]) -> list[str]:
    """The MedMNIST-style splits (train, val, test) a ``.npz`` file holds images and labels for."""
    npz_path = Path(path)
    _require_file(npz_path, ".npz file")
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            keys = set(data.keys())
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{npz_path} is not a readable .npz file ({error})") from None
    present = [s for s in NPZ_SPLITS if {f"{s}_images", f"{s}_labels"} <= keys]
    if not present:
        raise DataError(
            f"{npz_path}: no split found; a MedMNIST-style .npz holds train_images/train_labels (and val_, "
            f"test_); this file has {sorted(keys)}"
        )
    return present


def read_npz(
    path: str | os.PathLike[str], split: str, class_names: Sequence[str] | None = None
) -> LabeledSamples:
    """Read a MedMNIST-style ``.npz`` split (``{split}_images``, ``{split}_labels``) into memory.

    Labels of shape (N,) or (N, 1) are single-label; (N, C) with C > 1 is multi-label 0/1.
    """
    npz_path = Path(path)
    _require_file(npz_path, ".npz file")
    source = f"{npz_path}[{split}]"
    image_key, label_key = f"{split}_images", f"{split}_labels"
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            keys = list(data.keys())
            found = image_key in keys and label_key in keys
            if found:
                images, labels = data[image_key], data[label_key]
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{npz_path} is not a readable .npz file ({error})") from None
    if not found:
        raise DataError(
            f"{npz_path}: keys '{image_key}' and '{label_key}' expected; the file has {keys}. "
            "Pick a split that exists (train, val, test)."
        )
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise DataError(
            f"{source}: images {images.shape} and labels {labels.shape} do not match; expected "
            "(N, H, W) or (N, H, W, C) images and N labels"
        )
    if images.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{source}: images must be uint8 or uint16, got {images.dtype}")
    labels = labels.reshape(len(labels), -1) if labels.ndim > 1 else labels.reshape(-1, 1)
    multilabel = labels.shape[1] > 1
    if multilabel:
        if not np.isin(labels, (0, 1)).all():
            raise DataError(f"{source}: multi-label labels must be 0/1")
        num_classes = labels.shape[1]
        label_list: list[Label] = [tuple(int(v) for v in row) for row in labels]
    else:
        flat = labels[:, 0].astype(np.int64)
        num_classes = len(class_names) if class_names is not None else int(flat.max()) + 1
        bad = np.flatnonzero((flat < 0) | (flat >= num_classes))
        if bad.size:
            raise DataError(
                f"{source}: label {int(flat[bad[0]])} at index {int(bad[0])} out of range for "
                f"{num_classes} classes. Fix class_names."
            )
        label_list = [int(v) for v in flat]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"{source}: {len(names)} class_names for {num_classes} label columns")
    items = [Sample(path=None, label=label, array_index=i) for i, label in enumerate(label_list)]
    return LabeledSamples(items=items, class_names=names, multilabel=multilabel, source=source, arrays=images)


def digits_demo(size: int = 32) -> LabeledSamples:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as uint8 ``size``x``size`` arrays.

    It ships with scikit-learn, so the demo job and tests can train end to end with no download.
    Nearest-neighbour upscaling by whole pixels keeps the images exactly reproducible.
    """
    from sklearn.datasets import load_digits

    if size < 8 or size % 8:
        raise DataError(f"digits_demo size must be a positive multiple of 8, got {size}")
    digits = load_digits()
    factor = size // 8
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    arrays = pixels.repeat(factor, axis=1).repeat(factor, axis=2)
    items = [Sample(path=None, label=int(y), array_index=i) for i, y in enumerate(digits.target)]
    return LabeledSamples(
        items=items,
        class_names=[str(d) for d in range(10)],
        multilabel=False,
        source="sklearn digits demo",
        arrays=arrays,
    )
