"""Which resampling units the bootstrap uses for each data source."""

from __future__ import annotations

from pathlib import Path

from promptvit.data.sources import LabeledSamples, Sample
from promptvit.data.spec import DataSpec, sample_groups


def _samples(paths: list[str]) -> LabeledSamples:
    return LabeledSamples([Sample(p, 0) for p in paths], ["a", "b"], False, "test")


def test_csv_lesion_column_groups_images(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("file,dx,lesion_id\nISIC_1.jpg,a,L1\nISIC_2.jpg,a,L1\nISIC_3.jpg,b,L2\n")
    spec = DataSpec(kind="csv", path=str(csv), label_column="dx")
    groups, rule = sample_groups(_samples([str(tmp_path / f"ISIC_{i}.jpg") for i in (3, 1, 2)]), spec)
    assert groups == ["L2", "L1", "L1"] and "lesion_id" in rule


def test_csv_without_group_column_and_npz_resample_images(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\nx.png,a\n")
    groups, rule = sample_groups(_samples([str(tmp_path / "x.png")]), DataSpec(kind="csv", path=str(csv)))
    assert groups is None and rule.startswith("images")
    assert sample_groups(_samples(["y.png"]), DataSpec(kind="npz", path="d.npz"))[0] is None


def test_medfmc_endo_and_colon_study_ids() -> None:
    endo = DataSpec(kind="medfmc", path="m", dataset="endo", shots=1)
    names = [
        "/d/study_0001_abcd_frame1.png",
        "/d/study_0001_abcd_frame2.png",
        "/d/study_0002_abcd_frame1.png",
    ]
    groups, rule = sample_groups(_samples(names), endo)
    assert groups == [n.split("/")[-1][:18] for n in names] and len(set(groups)) == 2 and "endo" in rule
    colon = DataSpec(kind="medfmc", path="m", dataset="colon", shots=1)
    groups, _ = sample_groups(_samples(["/d/slide A_0001.png", "/d/slide A_0002.png"]), colon)
    assert groups == ["slide A", "slide A"]


def test_fast_statistics_equal_compute_metrics_on_a_resample() -> None:
    import numpy as np
    import pytest
    import torch

    from promptvit.train.clinical import fast_statistic
    from promptvit.train.metrics import compute_metrics

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(40, 3, generator=g).softmax(1)
    targets = torch.randint(0, 3, (40,), generator=g)
    idx = np.random.default_rng(1).integers(0, 40, size=40)
    expected = compute_metrics(scores[idx], targets[idx], multilabel=False)
    for metric in ("accuracy", "balanced_accuracy", "auc"):
        got = fast_statistic(metric, scores, targets, multilabel=False)(idx)
        assert got == pytest.approx(expected[metric], abs=1e-6), metric
