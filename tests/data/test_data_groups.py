"""Groups (patients, studies, slides, lesions): selection and test sets never hold an image of a training group."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptvit.cli import app
from promptvit.data import DataError, load_medfmc_split, make_few_shot_split, read_csv, read_label_list
from promptvit.data.fewshot import stratified_split
from promptvit.data.spec import DataSpec, sample_groups
from promptvit.protocols.spec import SourceSpec, SplitSpec
from promptvit.protocols.splits import fixed_split
from tests.data.test_data_check import noise

runner = CliRunner()


def _medfmc(root: Path, dataset: str, trainval: list[str], train: list[str]) -> Path:
    base = root / dataset
    (base / "images").mkdir(parents=True)
    (base / "trainval.txt").write_text("\n".join(trainval) + "\n")
    (base / "test_WithLabel.txt").write_text(trainval[0] + "\n")
    (base / f"{dataset}_1-shot_train_exp1.txt").write_text("\n".join(train) + "\n")
    return root


def test_medfmc_endo_validation_leaves_out_every_image_of_a_training_study(tmp_path: Path) -> None:
    studies = [f"13333_2021.12_{s:04d}" for s in range(4)]  # endo's study id: the first 18 characters
    lines = [f"{sid}_{i}.png {int(i == 0)} {int(i == 1)} 0 {int(i == 2)}" for sid in studies for i in range(3)]
    train = [lines[0], lines[4]]  # one image each of studies 0 and 1
    split = load_medfmc_split(_medfmc(tmp_path, "endo", lines, train), "endo", 1, 1, check_files=False)
    val_studies = {s.file_name[:18] for s in split.val.items}
    assert val_studies == set(studies[2:])  # not studies 0 and 1, though 4 of their images are not in train
    assert len(split.val) == 6 and {s.group for s in split.train.items} == set(studies[:2])


def test_medfmc_colon_validation_leaves_out_the_training_slides(tmp_path: Path) -> None:
    # colon's slide id: the file name without its last 9 characters ('_0001.png'); names contain spaces
    lines = [f"slide {s}_{i:04d}.png {s % 2}" for s in range(4) for i in range(3)]
    split = load_medfmc_split(_medfmc(tmp_path, "colon", lines, [lines[1]]), "colon", 1, 1, check_files=False)
    assert {s.file_name[:-9] for s in split.val.items} == {"slide 1", "slide 2", "slide 3"}


def test_chest_images_stand_alone(tmp_path: Path) -> None:
    lines = [f"img{i}.png " + ",".join(str(int(c == i % 19)) for c in range(19)) for i in range(6)]
    split = load_medfmc_split(_medfmc(tmp_path, "chest", lines, lines[:2]), "chest", 1, 1, check_files=False)
    assert [s.file_name for s in split.val.items] == [f"img{i}.png" for i in range(2, 6)]


def _patients_csv(tmp_path: Path, column: str = "patient") -> Path:
    """6 patients per class, 3 images each (a patient's images share its class)."""
    rows = [f"file,label,{column}"]
    for c in range(2):
        for p in range(6):
            for i in range(3):
                name = f"img/c{c}_p{p}_{i}.png"
                noise(tmp_path / name, c * 100 + p * 10 + i)
                rows.append(f"{name},{c},P{c}{p}")
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_group_column_keeps_each_patient_on_one_side(tmp_path: Path) -> None:
    samples = read_csv(_patients_csv(tmp_path), group_column="patient")
    assert samples.items[0].group == "P00" and len({s.group for s in samples.items}) == 12
    for seed in range(4):
        split = make_few_shot_split(samples, 1, seed, test_fraction=0.34)
        groups = {name: {s.group for s in part.items} for name, part in vars(split).items()}
        assert not groups["test"] & (groups["train"] | groups["val"])
        assert not groups["train"] & groups["val"]
        assert len(groups["test"]) == 4  # round(0.34 * 6) patients per class, all their images
        assert len(split.test) == 12 and len(split.val) == 3 * (12 - 4 - 2)
    # the same split without groups splits images, which lets a patient straddle train and test
    loose = [make_few_shot_split(read_csv(tmp_path / "labels.csv"), 1, s, test_fraction=0.34) for s in range(4)]
    straddle = [
        {s.file_name.rsplit("_", 1)[0] for s in x.test.items} & {s.file_name.rsplit("_", 1)[0] for s in x.val.items}
        for x in loose
    ]
    assert any(straddle)


def test_grouped_holdout_of_fixed_sources(tmp_path: Path) -> None:
    """FGVC's csv layout: the 10 % validation hold-out of train keeps patients whole."""
    source = SourceSpec(kind="csv", path=str(_patients_csv(tmp_path)), group_column="patient")
    split = fixed_split(SplitSpec(train=source, holdout_fraction=0.3, holdout_seed=1))
    assert not {s.group for s in split.train.items} & {s.group for s in split.val.items}
    assert len(split.val) == 2 * 2 * 3  # round(0.3 * 6) = 2 patients per class


def test_bad_group_columns_name_the_file_and_line(tmp_path: Path) -> None:
    path = _patients_csv(tmp_path)
    with pytest.raises(DataError, match=r"labels\.csv, line 1: group column 'patient_id' not in the header"):
        read_csv(path, group_column="patient_id")
    path.write_text(path.read_text().replace(",P03\n", ",\n", 1))
    with pytest.raises(DataError, match=r"labels\.csv, line 11: empty 'patient' field"):
        read_csv(path, group_column="patient")


def test_stratified_split_without_groups_splits_files_as_before() -> None:
    """Images without a group are their own unit: the seeded draw over files is unchanged."""
    from promptvit.data.sources import LabeledSamples, Sample

    items = [Sample(f"/d/{c}_{i}.png", c) for c in range(2) for i in range(10)]
    samples = LabeledSamples(items, ["a", "b"], False, "s")
    rest, test = stratified_split(samples, test_fraction=0.3, seed=5)
    import random

    rng = random.Random(5)  # the rule: per class, in order, rng.sample of the file keys
    expected = set(rng.sample([s.key for s in items[:10]], 3)) | set(rng.sample([s.key for s in items[10:]], 3))
    assert {s.key for s in test.items} == expected and len(rest) == 14


def test_bootstrap_resamples_the_csv_groups(tmp_path: Path) -> None:
    path = _patients_csv(tmp_path, column="case")
    samples = read_csv(path, group_column="case")
    groups, rule = sample_groups(samples, DataSpec(kind="csv", path=str(path), group_column="case"))
    assert groups == [s.group for s in samples.items] and rule == "CSV column case"


def test_data_fewshot_group_column(tmp_path: Path) -> None:
    path = _patients_csv(tmp_path)
    out = tmp_path / "out"
    args = ["data", "fewshot", str(path), "--out", str(out), "--shots", "1", "--seeds", "0,1", "--format", "vtab"]
    result = runner.invoke(app, [*args, "--group-column", "patient"])
    assert result.exit_code == 0, result.output
    patient = {s.file_name: s.group for s in read_csv(path, group_column="patient").items}
    for seed in (0, 1):
        folder = out / "1-shot" / f"seed{seed}"
        parts = {
            n: {patient[s.file_name] for s in read_label_list(folder / f"{n}.txt").items}
            for n in ("train", "val", "test")
        }
        assert not parts["test"] & (parts["train"] | parts["val"]) and not parts["train"] & parts["val"]
    assert "groups:" in (out / "README.txt").read_text()
    folder = runner.invoke(
        app, ["data", "fewshot", str(tmp_path / "img"), "--out", str(tmp_path / "o2"), "--group-column", "p"]
    )
    assert folder.exit_code == 2 and "--group-column reads a CSV column" in folder.output
