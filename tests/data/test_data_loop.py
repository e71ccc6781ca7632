"""The data loop of issue 24: what `data fewshot` writes (both formats, any name) is what `data check` checks
in full and what train, eval, report and the sweep protocols read by pointing at the folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from promptvit.cli import app
from promptvit.data import read_csv
from promptvit.data.spec import DATA_KINDS, DataSpec, evaluation_samples, make_split, resolve_data_spec
from promptvit.data.split_files import read_fewshot_folder
from tests.conftest import TINY_BACKBONES

runner = CliRunner()
TINY = TINY_BACKBONES["vit_token"][1]
BACKBONE = ["--backbone", "vit_tiny_patch16_224", *(f"--backbone.{k}={v}" for k, v in TINY.items())]


def cli(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result.output
    return result


def image_folder(root: Path, classes: tuple[str, ...] = ("normal", "pneumonia"), per_class: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            pixels[8 * c : 8 * (c + 1)] += 150  # a learnable band per class
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / name / f"img {i}.png")
    return root


def train(data: Path, out: Path, *extra: object) -> Path:
    result = cli(
        "train", "--data", data, *BACKBONE, "--epochs", 1, "--out", out, "--train.progress", "false", *extra
    )
    assert result.exit_code == 0, result.output
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


@pytest.mark.parametrize("fmt", ["vtab", "medfmc"])
def test_folder_to_checked_split_to_run_to_clinical_summary_to_report(fmt: str, tmp_path: Path) -> None:
    """The issue's loop through the CLI: fewshot -> check (all splits) -> train on a split -> eval -> report."""
    data = image_folder(tmp_path / "data")
    out = tmp_path / "splits"
    name = ["--name", "chestxr"] if fmt == "medfmc" else []
    assert (
        cli(
            "data", "fewshot", data, "--out", out, "--shots", "2,4", "--seeds", "1,2", "--format", fmt, *name
        ).exit_code
        == 0
    )

    checked = cli("data", "check", out, "--json", "--input-size", "16")
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.output)
    assert report["kind"] == "fewshot" and report["ok"]
    folder, _ = read_fewshot_folder(out)
    draws = [(k, e) for k in (2, 4) for e in (1, 2)]
    for k, exp in draws:  # every list the folder holds is counted, per split and class
        label = f"{k}-shot exp{exp}" if fmt == "medfmc" else f"{k}-shot/seed{folder.seeds[exp - 1]}"
        split = folder.split(k, exp)
        assert report["splits"][f"{label} train"]["counts"] == {"normal": k, "pneumonia": k}
        assert report["splits"][f"{label} val"]["images"] == len(split.val)
        assert report["splits"][f"{label} test" if fmt == "vtab" else "test"]["images"] == len(split.test)
    assert len(report["splits"]) == (2 + 2 * len(draws) if fmt == "medfmc" else 4 * len(draws))
    text = cli("data", "check", out, "--input-size", "16").output
    assert "per class normal 2, pneumonia 2" in text

    split_folder = out / "2-shot" / "seed2" if fmt == "vtab" else out
    draw = [] if fmt == "vtab" else ["--shots", 2, "--data.exp", 2]
    run = train(split_folder, tmp_path / "runs", *draw)
    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert (recorded["kind"], recorded["shots"], recorded["exp"]) == ("fewshot", 2, 2)  # what the run used
    assert run.name == "linear-2shot-exp2-seed0"  # two exps of one K never share a run folder
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_train"] == 4 and metrics["num_test"] == len(folder.test())

    shown = cli("eval", run)
    assert shown.exit_code == 0, shown.output
    flat = " ".join(shown.output.split())
    for words in (
        "95% CI",
        "accuracy",
        "AUC",
        "sensitivity %",
        "specificity %",
        "PPV %",
        "NPV %",
        "raw",
        "calibrated",
    ):
        assert words in flat, words
    assert "rule: youden" in flat and "positive class" in flat and "pneumonia" in flat
    evaluated = json.loads(cli("eval", run, "--json").output)
    assert evaluated["ci"]["low"] <= evaluated["accuracy"] <= evaluated["ci"]["high"]
    assert evaluated["auc_ci"]["low"] <= evaluated["auc"] <= evaluated["auc_ci"]["high"]
    assert set(evaluated["thresholds"]["classes"]["pneumonia"]) >= {
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
    }
    # the same numbers training printed for its test split
    assert evaluated["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert evaluated["ci"]["low"] == pytest.approx(metrics["test"]["ci"]["low"])
    train_shown = re.search(r"accuracy\s+│\s+([\d.]+)\s+│\s+\[([\d.]+), ([\d.]+)\]", shown.output)
    assert train_shown and float(train_shown.group(1)) == pytest.approx(evaluated["accuracy"], abs=0.01)

    reported = cli("report", run, "--out", tmp_path / "report")
    assert reported.exit_code == 0, reported.output
    markdown = (tmp_path / "report" / "report.md").read_text()
    task = "chestxr" if fmt == "medfmc" else "splits"
    assert f"{task} 2-shot (accuracy)" in markdown and f"{metrics['test']['accuracy']:.2f}" in markdown
    assert "runs — backbone vit_tiny_patch16_224" in markdown


def test_data_check_reads_a_npz_and_eval_scores_its_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 6), ("test", 8)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 60, (n, 16, 16), dtype=np.uint8)
        images[labels == 1, :8] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    arrays["test_images"][0] = arrays["train_images"][0]  # a train image copied into test
    np.savez(tmp_path / "mnist.npz", **arrays)
    checked = cli("data", "check", tmp_path / "mnist.npz", "--json", "--input-size", "0")
    report = json.loads(checked.output)
    assert report["kind"] == "npz" and {s: v["images"] for s, v in report["splits"].items()} == {
        "train": 12,
        "val": 6,
        "test": 8,
    }
    assert checked.exit_code == 1 and [p["code"] for p in report["problems"]] == ["duplicate_across_splits"]
    run = train(tmp_path / "mnist.npz", tmp_path / "runs", "--data.allow-duplicates", "true")
    evaluated = cli("eval", run, "--data", tmp_path / "mnist.npz", "--data-kind", "npz", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["num_samples"] == 8  # the .npz's own test split


def test_every_listed_data_kind_reads(tmp_path: Path) -> None:
    """Each kind `--data-kind` lists trains (make_split) and evaluates (evaluation_samples) from its layout."""
    data = image_folder(tmp_path / "data", per_class=10)
    rows = ["file,label"] + [f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    assert (
        cli(
            "data",
            "fewshot",
            data,
            "--out",
            tmp_path / "fs",
            "--shots",
            "2",
            "--seeds",
            "3",
            "--format",
            "vtab",
        ).exit_code
        == 0
    )
    for split in ("train", "val", "test"):
        image_folder(tmp_path / "splits" / split, per_class=3 if split != "train" else 6)
    np.savez(
        tmp_path / "d.npz",
        **{
            f"{s}_{k}": v
            for s in ("train", "val", "test")
            for k, v in (("images", np.zeros((4, 8, 8), np.uint8)), ("labels", np.array([0, 1, 0, 1])))
        },
    )
    paths = {
        "folder": data,
        "csv": data / "labels.csv",
        "npz": tmp_path / "d.npz",
        "fewshot": tmp_path / "fs",
        "lists": tmp_path / "fs" / "2-shot" / "seed3",
        "splits": tmp_path / "splits",
    }
    for kind, path in paths.items():
        spec = DataSpec(kind="auto", path=str(path), shots=2)
        assert resolve_data_spec(spec).kind == ("fewshot" if kind == "lists" else kind), kind
        forced = DataSpec(kind=kind, path=str(path), shots=2)
        split = make_split(forced, seed=0)
        assert split.train.class_counts() == [2, 2], kind
        assert len(evaluation_samples(forced)) > 0, kind
    assert set(paths) | {"auto", "vtab", "fgvc", "medfmc", "digits"} == set(DATA_KINDS)
    help_text = " ".join(cli("eval", "--help").output.split())
    assert all(kind in help_text for kind in DATA_KINDS[1:])


def test_csv_options_reach_every_data_verb(tmp_path: Path) -> None:
    data = image_folder(tmp_path / "images", per_class=10)
    rows = ["image,diagnosis"] + [
        f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(data.rglob("*.png"))
    ]
    table = tmp_path / "meta" / "table.csv"
    table.parent.mkdir()
    table.write_text("\n".join(rows) + "\n")
    options = ["--image-root", data, "--file-column", "image", "--label-column", "diagnosis"]
    assert cli("data", "check", table, *options, "--input-size", "16").exit_code == 0
    assert (
        cli(
            "data", "fewshot", table, "--out", tmp_path / "fs", "--shots", "2", "--seeds", "1", *options
        ).exit_code
        == 0
    )
    run = train(table, tmp_path / "runs", "--shots", "2", *options)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["label_column"] == "diagnosis"
    assert cli("eval", run, "--data", table, *options, "--json").exit_code == 0
    for verb in ("train", "eval", "analyze"):
        help_text = cli(verb, "--help").output
        assert all(option in help_text for option in ("--image-root", "--file-column", "--label-column")), (
            verb
        )
    assert len(read_csv(table, image_root=data, file_column="image", label_column="diagnosis")) == 20


def test_sweep_protocols_read_a_fewshot_folder(tmp_path: Path) -> None:
    from promptvit.protocols import load_records, run_sweep
    from promptvit.protocols.sweep import SweepConfig
    from tests.protocols.helpers import tiny_base

    data = image_folder(tmp_path / "data", per_class=10)
    assert (
        cli(
            "data",
            "fewshot",
            data,
            "--out",
            tmp_path / "root" / "chestxr",
            "--shots",
            "2",
            "--seeds",
            "5",
            "--name",
            "chestxr",
        ).exit_code
        == 0
    )
    assert (
        cli(
            "data",
            "fewshot",
            data,
            "--out",
            tmp_path / "lists",
            "--shots",
            "2",
            "--seeds",
            "5",
            "--format",
            "vtab",
        ).exit_code
        == 0
    )
    protocols = {
        "medfmc": {
            "name": "medfmc",
            "root": str(tmp_path / "root"),
            "datasets": ["chestxr"],
            "shots": [2],
            "exps": [1],
            "seeds": [0],
            "recipe": None,
        },
        "fewshot": {
            "name": "fewshot",
            "tasks": {"chestxr": {"kind": "fewshot", "path": str(tmp_path / "root" / "chestxr")}},
            "shots": [2],
        },
        "vtab": {
            "name": "vtab",
            "root": str(tmp_path / "lists" / "2-shot"),
            "tasks": ["seed5"],
            "seeds": [0],
            "recipe": None,
        },
    }
    for name, protocol in protocols.items():
        config = SweepConfig.model_validate(
            {"protocol": protocol, "base": tiny_base(epochs=1), "methods": ["linear"]}
        )
        outcome = run_sweep(config, results=tmp_path / f"res-{name}")
        assert not outcome.failures, (name, outcome.failures)
        (record,) = load_records(tmp_path / f"res-{name}").records
        # VTAB-1k's final stage trains on train800val200: the folder's trainval.txt (4 + 5 + 5)
        assert record["sizes"]["train"] == (14 if name == "vtab" else 4) and record["metric"] == "accuracy"
        if name == "fewshot":  # the draw as written: its seed trains it
            assert record["seed"] == 5 and record["split"] == "exp1"


def test_groups_survive_the_round_trip_through_a_fewshot_folder(tmp_path: Path) -> None:
    """A CSV's patient column (data fewshot --group-column) is read back with the lists: a run on the folder
    keeps the groups its bootstrap resamples."""
    from promptvit.data.spec import sample_groups

    data = image_folder(tmp_path / "images", per_class=12)
    rows = ["file,label,patient"] + [
        f"{p.parent.name}/{p.name},{p.parent.name},{p.parent.name}-{i // 2}"
        for i, p in enumerate(sorted(data.rglob("*.png")))
    ]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    args = ("--shots", 2, "--seeds", 4, "--group-column", "patient")
    for fmt in ("vtab", "medfmc"):
        out = tmp_path / fmt
        assert cli("data", "fewshot", data / "labels.csv", "--out", out, "--format", fmt, *args).exit_code == 0
        split = make_split(DataSpec(path=str(out), shots=2), seed=0)
        written = read_csv(data / "labels.csv", group_column="patient")
        expected = {Path(s.path).resolve(): s.group for s in written.items}
        assert all(s.group == expected[Path(s.path).resolve()] for s in split.test.items)
        groups, rule = sample_groups(split.test, resolve_data_spec(DataSpec(path=str(out), shots=2)))
        assert groups is not None and len(set(groups)) < len(groups) and "group" in rule
        seen = {s.group for part in (split.train, split.val) for s in part.items}
        assert not seen & {s.group for s in split.test.items}  # a patient stays on one side
