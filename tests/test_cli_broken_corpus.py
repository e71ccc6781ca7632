"""Every CLI verb on a corpus of broken inputs: each must end in a clear error (or work), never a traceback.

An exception that escapes a verb is a bug by definition (docs/bad-inputs.md): user mistakes print one
``error:`` line naming the input and exit 2. The corpus crosses each verb's inputs with broken files:
missing, empty, garbage bytes, wrong encodings, wrong YAML shapes, folders for files, FIFOs, links, device
nodes, names holding Rich markup.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from promptvit.cli import app
from tests.conftest import TINY_BACKBONES

TINY = TINY_BACKBONES["vit_token"][1]
BROKEN = (
    "missing",
    "empty_file",
    "garbage",
    "text",
    "yaml_list",
    "yaml_duplicate",
    "latin1",
    "empty_dir",
    "junk_dir",
    "fifo",
    "dangling_link",
    "markup[/]name",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The broken inputs plus a working run, image and data folder to combine them with."""
    tmp = tmp_path_factory.mktemp("corpus")
    paths = {name: tmp / name for name in BROKEN}
    paths["empty_file"].write_bytes(b"")
    paths["garbage"].write_bytes(np.random.default_rng(0).bytes(2048))
    paths["text"].write_text("just some notes\n")
    paths["yaml_list"].write_text("- train\n- method\n")
    paths["yaml_duplicate"].write_text("train: {epochs: 1}\ntrain: {epochs: 2}\n")
    paths["latin1"].write_bytes("name: caf\xe9\n".encode("latin-1"))
    paths["empty_dir"].mkdir()
    paths["junk_dir"].mkdir()
    (paths["junk_dir"] / "a").mkdir()
    (paths["junk_dir"] / "a" / "x.png").write_bytes(b"not a png")
    os.mkfifo(paths["fifo"])
    paths["dangling_link"].symlink_to(tmp / "nowhere")
    paths["device"] = tmp / "mynull"  # a private null device, never the real /dev/null
    try:
        os.mknod(paths["device"], 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:  # not root: a FIFO is the nearest special file
        os.mkfifo(paths["device"])
    data = tmp / "data"
    rng = np.random.default_rng(0)
    for c in range(2):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                data / f"c{c}" / f"{i}.png"
            )
    config = {
        "backbone": {"name": "vit_tiny_patch16_224", "options": TINY},
        "data": {"kind": "folder", "path": str(data), "shots": 2, "test_fraction": 0.34, "val_per_class": 1},
        "train": {"epochs": 1, "batch_size": 4, "progress": False},
        "output_dir": str(tmp / "runs"),
        "name": "good",
    }
    (tmp / "good.yaml").write_text(yaml.safe_dump(config))
    sweep = {
        "protocol": {
            "name": "fewshot",
            "tasks": {"t": {"kind": "folder", "path": str(data)}},
            "shots": [2],
            "seeds": [0],
        },
        "base": {k: config[k] for k in ("backbone", "train")},
        "methods": ["linear"],
    }
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    result = CliRunner().invoke(app, ["train", "--config", str(tmp / "good.yaml")])
    assert result.exit_code == 0, result.output
    paths.update(run=tmp / "runs" / "good", image=data / "c0" / "0.png", data=data, out=tmp / "out")
    return paths


def invocations() -> list[tuple[str, list[str]]]:
    """(id, argv with {BROKEN}/{run}/{image}/{data}/{out} placeholders)."""
    templates = {
        "train-config": ["train", "--config", "{X}"],
        "train-data": [
            "train",
            "--backbone",
            "vit_tiny_patch16_224",
            "--data",
            "{X}",
            "--epochs",
            "1",
            "--backbone.img-size",
            "16",
            "--backbone.depth",
            "1",
            "--out",
            "{out}",
        ],
        "train-csv": [
            "train",
            "--backbone",
            "vit_tiny_patch16_224",
            "--data",
            "{X}",
            "--data-kind",
            "csv",
            "--backbone.img-size",
            "16",
            "--out",
            "{out}",
        ],
        "train-weights": ["train", "--config", "{good}", "--weights", "{X}", "--name", "w"],
        "eval-run": ["eval", "{X}"],
        "eval-data": ["eval", "{run}", "--data", "{X}"],
        "eval-out": ["eval", "{run}", "--out", "{X}"],
        "predict-artifact": ["predict", "{X}", "{image}", "--out", "{out}/p.csv"],
        "predict-images": ["predict", "{run}", "{X}", "--out", "{out}/p.csv"],
        "predict-out": ["predict", "{run}", "{image}", "--out", "{X}"],
        "analyze-run": ["analyze", "{X}", "--out", "{out}/a"],
        "analyze-data": ["analyze", "{run}", "--data", "{X}", "--out", "{out}/a"],
        "analyze-compare": ["analyze", "{run}", "--compare", "{X}", "--out", "{out}/a", "--max-samples", "4"],
        "sweep": ["sweep", "{X}", "--results", "{out}/r"],
        "report": ["report", "{X}", "--out", "{out}/rep"],
    }
    cases = [
        (f"{verb}:{name}", [a.replace("{X}", "{" + name + "}") for a in argv])
        for verb, argv in templates.items()
        for name in BROKEN
    ]
    cases += [
        ("train:override-without-value", ["train", "--config", "{good}", "--train.lr"]),
        ("train:override-not-dotted", ["train", "--config", "{good}", "--lr", "1"]),
        ("train:override-bad-section", ["train", "--config", "{good}", "--train.epochs.deep", "1"]),
        ("train:negative-shots", ["train", "--config", "{good}", "--shots", "-1"]),
        ("train:unknown-method", ["train", "--config", "{good}", "--method", "nope"]),
        ("train:name-escapes", ["train", "--config", "{good}", "--name", "../../x"]),
        (
            "predict:batch-size-0",
            ["predict", "{run}", "{image}", "--batch-size", "0", "--out", "{out}/p.csv"],
        ),
        ("predict:out-under-a-file", ["predict", "{run}", "{image}", "--out", "{garbage}/p.csv"]),
        ("eval:out-under-a-file", ["eval", "{run}", "--out", "{garbage}/m.json"]),
        ("analyze:out-is-a-file", ["analyze", "{run}", "--out", "{garbage}", "--max-samples", "4"]),
        ("predict:device-node", ["predict", "{run}", "{image}", "--out", "{device}"]),
        ("eval:data-kind-unknown", ["eval", "{run}", "--data", "{data}", "--data-kind", "nope"]),
        ("analyze:max-samples-0", ["analyze", "{run}", "--out", "{out}/a", "--max-samples", "0"]),
        ("sweep:bad-var", ["sweep", "{yaml_list}", "--var", "novalue"]),
        ("sweep:bad-backend", ["sweep", "{yaml_list}", "--backend", "gpu-cluster"]),
        (
            "bench:unknown-method",
            [
                "bench-methods",
                "--methods",
                "nope",
                "--backbone.depth",
                "1",
                "--image-size",
                "16",
                "--backbone.patch-size",
                "8",
                "--out",
                "{out}/b",
            ],
        ),
        ("bench:out-is-a-file", ["bench-methods", "--out", "{garbage}", "--methods", "linear"]),
        ("sweep:results-is-a-file", ["sweep", "{good_sweep}", "--results", "{garbage}"]),
        ("report:out-is-a-file", ["report", "{run}", "--out", "{garbage}"]),
        ("bench:unknown-backbone", ["bench-methods", "--backbone", "not_a_model", "--out", "{out}/b"]),
        ("bench:bad-option", ["bench-methods", "--backbone.nonsense", "1", "--out", "{out}/b"]),
    ]
    return cases


CASES = invocations()


@pytest.mark.parametrize(("case", "argv"), CASES, ids=[c for c, _ in CASES])
def test_no_traceback(case: str, argv: list[str], corpus: dict[str, Path]) -> None:
    values = {name: str(path) for name, path in corpus.items()}
    values["good"] = str(corpus["run"].parent.parent / "good.yaml")
    values["good_sweep"] = str(corpus["run"].parent.parent / "sweep.yaml")
    args = [arg.format(**values) if "{" in arg and "[/]" not in arg else arg for arg in argv]
    args = [a.replace("{markup[/]name}", values["markup[/]name"]) for a in args]
    result = CliRunner().invoke(app, args)
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not escaped, f"{case}: {type(result.exception).__name__}: {result.exception}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    if result.exit_code != 0:  # a refusal is one clear line, not a usage dump or a bare code
        assert "error" in result.output.lower() or "Error" in result.output, result.output
