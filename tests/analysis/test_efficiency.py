"""Efficiency portrait: structure and sanity of the numbers (speed itself is never asserted)."""

from __future__ import annotations

import functools

import pytest

import promptvit
from promptvit.analysis.efficiency import efficiency_portrait, efficiency_table, plot_efficiency
from promptvit.backbones import create_backbone
from tests.families import FAMILY_BUILDS

ARCH, OPTIONS, SIZE = FAMILY_BUILDS["vit_token"]
# picklable, so that the CPU memory probe can rebuild the backbone in a fresh process
FACTORY = functools.partial(create_backbone, ARCH, **OPTIONS)


def test_portrait_of_two_methods_with_linear_reference(tmp_path) -> None:
    methods = [("vpt", {"prompt_length": 2}), ("lora", {"rank": 2})]
    rows = efficiency_portrait(
        FACTORY,
        methods,
        num_classes=3,
        batch_size=2,
        image_size=SIZE,
        steps=1,
        repeats=2,
        device="cpu",
        warmup=1,
        epoch_images=10,
    )
    assert [r["label"] for r in rows] == ["linear", "vpt", "lora"]
    assert [r["reference"] for r in rows] == [True, False, False]
    for row, (name, options) in zip(rows, [("linear", {}), *methods], strict=True):
        expected = promptvit.wrap(FACTORY(), name, num_classes=3, **options).parameter_summary()
        assert row["tuned_params"] == expected["tuned"] and row["total_params"] == expected["total"]
        assert row["memory_label"] == "peak RSS (CPU)"
        assert row["memory_mb"] is not None and row["memory_mb"] > 0, row["memory_note"]
        for key in ("train_step_s", "train_img_s", "epoch_s", "infer_img_s"):
            stat = row[key]
            assert len(stat["values"]) == 2 and stat["min"] <= stat["median"] <= stat["max"]
            assert stat["min"] > 0
        for epoch, speed in zip(row["epoch_s"]["values"], row["train_img_s"]["values"], strict=True):
            assert epoch == pytest.approx(10 / speed)  # epoch time derived from the same steps
    assert rows[0]["ratio_to_linear"] == {k: 1.0 for k in rows[0]["ratio_to_linear"]}
    assert rows[1]["ratio_to_linear"]["tuned_params"] == rows[1]["tuned_params"] / rows[0]["tuned_params"]
    table = efficiency_table(rows)
    assert table.count("\n| ") == 4 and "peak RSS (CPU)" in table  # header + 3 rows
    plot_efficiency(rows, tmp_path / "efficiency.png")
    assert (tmp_path / "efficiency.png").stat().st_size > 0


def test_unpicklable_factory_reports_why_memory_is_missing() -> None:
    rows = efficiency_portrait(
        lambda: create_backbone(ARCH, **OPTIONS),
        [("linear", {})],
        num_classes=3,
        batch_size=1,
        image_size=SIZE,
        steps=1,
        repeats=1,
        warmup=0,
    )
    assert len(rows) == 1 and rows[0]["memory_mb"] is None
    assert "not measured" in rows[0]["memory_note"]
