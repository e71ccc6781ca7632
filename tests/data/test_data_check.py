"""``promptvit data check`` finds planted problems and passes a clean set; training refuses cross-split
duplicates unless allowed; ``promptvit data fewshot`` writes leak-free, seeded K-shot split files."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from promptvit.cli import app
from promptvit.data import read_label_list
from promptvit.data.check import check_splits, read_layout

runner = CliRunner()


def noise(path: Path, seed: int, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def clean_splits(root: Path) -> Path:
    """train/ val/ test/ with classes a and b; every image has its own content."""
    seed = 0
    for split, count in (("train", 3), ("val", 1), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(count):
                seed += 1
                noise(root / split / cls / f"{split}{i}.png", seed)
    return root


def check_json(path: Path, *extra: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["data", "check", str(path), "--json", *extra])
    return result.exit_code, json.loads(result.output)


def test_clean_set_passes(tmp_path: Path) -> None:
    root = clean_splits(tmp_path / "d")
    code, report = check_json(root, "--input-size", "16")
    assert code == 0 and report["ok"] and report["problems"] == [] and report["kind"] == "splits"
    assert {k: v["images"] for k, v in report["splits"].items()} == {"train": 6, "val": 2, "test": 4}
    assert report["splits"]["train"]["counts"] == {"a": 3, "b": 3}
    text = runner.invoke(app, ["data", "check", str(root), "--input-size", "16"]).output
    assert "nothing blocks training" in text and "train 6 (2 classes)" in text


def test_planted_problems_are_found(tmp_path: Path) -> None:
    root = clean_splits(tmp_path / "d")
    corrupt = root / "train" / "a" / "bad.png"
    corrupt.write_bytes((root / "train" / "a" / "train0.png").read_bytes()[:60])
    shutil.copy(root / "train" / "b" / "train1.png", root / "test" / "b" / "copy of train1.png")
    noise(root / "test" / "c" / "only_in_test.png", 99)
    tiny = noise(root / "train" / "b" / "tiny.png", 100, size=1)
    code, report = check_json(root, "--input-size", "16")
    assert code == 1 and not report["ok"]
    problems = {p["code"]: p for p in report["problems"]}
    assert problems["unreadable"]["files"] == [str(corrupt)] and problems["unreadable"]["severity"] == "error"
    assert "copy of train1.png" in problems["duplicate_across_splits"]["message"]
    assert "train1.png (train)" in problems["duplicate_across_splits"]["message"]
    assert problems["label_not_in_training"]["files"] == ["c"]
    assert problems["smaller_than_input"]["files"] == [str(tiny)]
    assert set(problems) == {
        "unreadable",
        "duplicate_across_splits",
        "label_not_in_training",
        "smaller_than_input",
    }
    corrupt.unlink()
    (root / "test" / "b" / "copy of train1.png").unlink()
    code, report = check_json(root, "--input-size", "16")
    assert code == 0  # the rest are warnings ...
    code, _ = check_json(root, "--input-size", "16", "--strict")
    assert code == 1  # ... which --strict makes blocking


def test_vtab_copy_overlap_and_missing_folder(tmp_path: Path) -> None:
    task = tmp_path / "cifar"
    for i in range(4):
        noise(task / "images" / f"{i}.jpg", i)
    (task / "train800val200.txt").write_text("images/0.jpg 0\nimages/1.jpg 1\n")
    (task / "test.txt").write_text("images/2.jpg 0\nimages/1.jpg 1\n")
    report = check_splits(read_layout(task), input_size=None)
    assert report.kind == "vtab" and [p.code for p in report.blocking()] == ["split_overlap"]
    assert "images/1.jpg" in report.problems[0].message
    result = runner.invoke(app, ["data", "check", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not found" in result.output and "Traceback" not in result.output


def _train_config(tmp_path: Path, data: Path) -> Path:
    config = {
        "backbone": {
            "name": "vit_tiny_patch16_224",
            "options": {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        },
        "data": {"kind": "folder", "path": str(data), "shots": 1, "test_fraction": 0.5, "val_per_class": 1},
        "train": {"epochs": 1, "batch_size": 2, "optimizer": "adamw", "lr": 0.01, "progress": True},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_training_refuses_cross_split_duplicates_unless_allowed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(4):
        noise(data / "a" / f"{i}.png", 7)  # four copies of one image: any split puts copies on two sides
        noise(data / "b" / f"{i}.png", 10 + i)
    config = _train_config(tmp_path, data)
    refused = runner.invoke(app, ["train", "-c", str(config)])
    assert (
        refused.exit_code == 2
        and "identical" in refused.output
        and "--data.allow-duplicates" in refused.output
    )
    allowed = runner.invoke(app, ["train", "-c", str(config), "--data.allow-duplicates", "true"])
    assert allowed.exit_code == 0, allowed.output
    line = "data: train 2 images (2/2 classes), val 2 images (2/2 classes), test 4 images (2/2 classes)"
    assert line in allowed.output
    run_dir = next((tmp_path / "runs").iterdir())
    assert (run_dir / "data.txt").read_text().splitlines()[0] == line


def test_fewshot_vtab_files_are_seeded_stratified_and_leak_free(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for c in range(3):
        for i in range(8):
            noise(data / f"class {c}" / f"img {i}.png", c * 10 + i)
    args = ["data", "fewshot", str(data), "--shots", "1,2", "--seeds", "0,1", "--format", "vtab"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "o1")]).exit_code == 0
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "o2")]).exit_code == 0
    again = runner.invoke(app, [*args, "--out", str(tmp_path / "o1")])
    assert again.exit_code == 2 and "not an empty folder" in again.output
    tests = set()
    for k in (1, 2):
        for seed in (0, 1):
            folder = tmp_path / "o1" / f"{k}-shot" / f"seed{seed}"
            parts = {n: read_label_list(folder / f"{n}.txt") for n in ("train", "val", "trainval", "test")}
            keys = {n: {s.key for s in p.items} for n, p in parts.items()}
            assert Counter(parts["train"].class_names[s.label] for s in parts["train"].items) == {
                "0": k,
                "1": k,
                "2": k,
            }
            assert not keys["train"] & keys["val"] and not keys["trainval"] & keys["test"]
            assert keys["trainval"] == keys["train"] | keys["val"]
            assert all(
                Path(s.path).parent.name.endswith(parts["train"].class_names[s.label])
                for s in parts["train"].items
            )
            tests.add(frozenset(keys["test"]))
            twin = tmp_path / "o2" / f"{k}-shot" / f"seed{seed}" / "train.txt"
            assert twin.read_text() == (folder / "train.txt").read_text()
            assert runner.invoke(app, ["data", "check", str(folder), "--input-size", "16"]).exit_code == 0
    assert len(tests) == 1  # one test split for every K and seed
    assert (tmp_path / "o1" / "classes.txt").read_text().split("\n")[:3] == ["class 0", "class 1", "class 2"]
    draws = {(tmp_path / "o1" / "2-shot" / f"seed{s}" / "train.txt").read_text() for s in (0, 1)}
    assert len(draws) == 2  # seeds differ


def test_fewshot_medfmc_format_for_a_multilabel_csv(tmp_path: Path) -> None:
    rows = ["file,x,y"]
    for i in range(12):
        noise(tmp_path / "img" / f"{i}.png", i)
        rows.append(f"img/{i}.png,{i % 2},{1 if i % 3 == 0 else 0}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    from promptvit.data import read_csv
    from promptvit.data.split_files import write_fewshot_files

    samples = read_csv(tmp_path / "labels.csv", label_columns=["x", "y"])
    written = write_fewshot_files(
        samples, tmp_path / "out", shots=[1], seeds=[3, 4], name="mine", test_fraction=0.25
    )
    names = sorted(p.name for p in written)
    assert names == [
        "mine_1-shot_train_exp1.txt",
        "mine_1-shot_train_exp2.txt",
        "mine_1-shot_val_exp1.txt",
        "mine_1-shot_val_exp2.txt",
        "test_WithLabel.txt",
        "trainval.txt",
    ]
    train = (tmp_path / "out" / "mine_1-shot_train_exp1.txt").read_text().splitlines()
    labels = [tuple(map(int, line.rsplit(" ", 1)[1].split(","))) for line in train]
    # as MedFMC's lists are relative to images/, names are relative to the image root the README names
    assert all((tmp_path / "img" / line.rsplit(" ", 1)[0]).is_file() for line in train)
    assert f"relative to {tmp_path / 'img'}" in (tmp_path / "out" / "README.txt").read_text()
    assert all(sum(label[c] for label in labels) >= 1 for c in range(2))  # K=1 positive per class at least
    val = set((tmp_path / "out" / "mine_1-shot_val_exp1.txt").read_text().splitlines())
    assert not val & set(train)
