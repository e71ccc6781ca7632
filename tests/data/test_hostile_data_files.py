"""Hostile data files, third pass (issue 25; docs/bad-inputs.md, "Data files, third pass"): each case gets a
one-line error naming the file or option, or the correct result. One function per row, the row's test id."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from promptvit.cli import app
from promptvit.data import DataError, read_csv, read_image_folder, read_label_list
from promptvit.data.errors import DataWarning
from promptvit.data.spec import DataSpec, make_split
from tests.conftest import TINY_BACKBONES

runner = CliRunner()
TINY = TINY_BACKBONES["vit_token"][1]


def png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(value).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def folder(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 6) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            png(root / name / f"{i}.png", 10 * c + i)
    return root


def cli(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result.output
    return result


def clear_error(result, *names: str) -> None:
    """Exit code 2, one error line naming each of ``names``, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    flat = " ".join(result.output.split())
    for name in names:
        assert name in flat, (name, result.output)


def fewshot_name_escapes_out(tmp: Path) -> None:
    data = folder(tmp / "data")
    result = cli(
        "data",
        "fewshot",
        data,
        "--out",
        tmp / "out",
        "--name",
        "../../escape",
        "--shots",
        "1",
        "--seeds",
        "1",
    )
    clear_error(result, "../../escape", "plain name")
    assert not (tmp / "out").exists() and not list(tmp.parent.glob("escape*"))


def fewshot_newline_in_file_name(tmp: Path) -> None:
    data = folder(tmp / "data")
    png(data / "a" / "two\nlines.png", 99)
    result = cli(
        "data", "fewshot", data, "--out", tmp / "out", "--shots", "1", "--seeds", "1", "--format", "vtab"
    )
    clear_error(result, "line break", "rename the file")
    assert not (tmp / "out").exists()  # nothing written: every list is checked before the first write


def fewshot_repeated_seed(tmp: Path) -> None:
    data = folder(tmp / "data")
    result = cli("data", "fewshot", data, "--out", tmp / "out", "--shots", "1", "--seeds", "1,1")
    clear_error(result, "--seeds", "[1]", "more than once")
    assert not (tmp / "out").exists()


def vtab_label_out_of_range(tmp: Path) -> None:
    task = tmp / "patch_camelyon"  # a 2-class VTAB-1k task
    for split in ("train800", "val200", "train800val200", "test"):
        png(task / "images" / f"{split}.png", len(split))
        (task / f"{split}.txt").write_text(f"images/{split}.png {99999999999 if split == 'test' else 1}\n")
    result = cli("data", "check", task, "--input-size", "0")
    clear_error(result, "test.txt", "99999999999")
    unknown_task = tmp / "mine"  # a list of another task: no class count to hold it to, but a class index
    unknown_task.mkdir()
    (unknown_task / "list.txt").write_text("x.png 99999999999\n")
    with pytest.raises(DataError, match=r"list.txt, line 1: label 99999999999 is not a class index"):
        read_label_list(unknown_task / "list.txt", check_files=False)


def vtab_list_latin1(tmp: Path) -> None:
    task = tmp / "dtd"
    png(task / "images" / "caf\xe9.png")
    for split in ("train800val200", "test"):
        (task / f"{split}.txt").write_bytes("images/caf\xe9.png 0\n".encode("latin-1"))
    clear_error(cli("data", "check", task), "train800val200.txt", "not UTF-8")


def empty_classes_list(tmp: Path) -> None:
    data = folder(tmp / "data")
    args = ["train", "--data", data, "--backbone", "vit_tiny_patch16_224", "--data.classes", "[]"]
    clear_error(cli(*args), "data.classes is empty")


def case_variant_labels(tmp: Path) -> None:
    rows = ["file,label"] + [
        f"{i}.png,{name}" for i, name in enumerate(["cat", "Cat", "CAT", "dog", "dog", "cat"])
    ]
    (tmp / "l.csv").write_text("\n".join(rows) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = read_csv(tmp / "l.csv", check_files=False)
    assert samples.class_names == ["CAT", "Cat", "cat", "dog"]  # kept apart, as written...
    assert any(  # ...but said
        issubclass(w.category, DataWarning) and "'CAT' / 'Cat' / 'cat'" in str(w.message) for w in caught
    ), [str(w.message) for w in caught]
    folder(tmp / "folders", classes=("Cat", "cat"), per_class=1)
    if len(os.listdir(tmp / "folders")) == 2:  # a case-sensitive file system
        with pytest.warns(DataWarning, match="differ only in case"):
            read_image_folder(tmp / "folders")


def csv_same_file_two_spellings(tmp: Path) -> None:
    png(tmp / "c0" / "x.png")
    (tmp / "l.csv").write_text("file,label\nc0/x.png,a\n./c0/x.png,b\n")
    with pytest.raises(
        DataError, match=r"line 3: './c0/x.png' is already listed at line 2 \(written 'c0/x.png'"
    ):
        read_csv(tmp / "l.csv")


def one_class_folder(tmp: Path) -> None:
    data = folder(tmp / "data", classes=("only",))
    args = ["train", "--data", data, "--backbone", "vit_tiny_patch16_224", "--out", tmp / "runs"]
    args += [f"--backbone.{k}={v}" for k, v in TINY.items()]
    clear_error(cli(*args), "one class", "'only'", "at least two")
    with pytest.raises(DataError, match="one class"):
        make_split(DataSpec(path=str(data), shots=1), seed=0)
    clear_error(
        cli("data", "fewshot", data, "--out", tmp / "fs", "--shots", "1", "--seeds", "1"), "one class"
    )


CASES: list[Callable[[Path], None]] = [
    fewshot_name_escapes_out,
    fewshot_newline_in_file_name,
    fewshot_repeated_seed,
    vtab_label_out_of_range,
    vtab_list_latin1,
    empty_classes_list,
    case_variant_labels,
    csv_same_file_two_spellings,
    one_class_folder,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_data_file(case: Callable[[Path], None], tmp_path: Path) -> None:
    case(tmp_path)
