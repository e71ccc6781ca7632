"""`promptvit analyze` and `promptvit bench-methods` end to end on a tiny trained run."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.test_cli import invoke, write_config, write_image_folder


def test_analyze_a_run_writes_every_figure_and_json(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", per_class=10)
    config = write_config(tmp_path, data, method="vpt")
    assert invoke("train", "--config", str(config), "--name", "vpt").exit_code == 0
    assert invoke("train", "--config", str(config), "--method", "linear", "--name", "linear").exit_code == 0
    run = tmp_path / "runs" / "vpt"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    out = tmp_path / "analysis"
    result = invoke(
        "analyze", str(run), "--out", str(out), "--compare", str(tmp_path / "runs" / "linear"), "--bins", "4"
    )
    assert result.exit_code == 0, result.output
    numbers = json.loads((out / "analysis.json").read_text())
    assert numbers["sample"]["n"] > 0
    for figure in ("calibration.png", "attention_distance.png", "nmi.png", "reliability.png"):
        assert (out / figure).stat().st_size > 1000, figure
    reliability = numbers["views"]["reliability"]
    stored_t = json.loads((run / "artifact" / "adapter_config.json").read_text())["calibration"]["temperature"]
    assert set(reliability) == {"vpt", "linear"} and set(reliability["vpt"]) == {"as trained", "calibrated"}
    assert sum(reliability["vpt"]["as trained"]["bins"]["counts"]) == numbers["sample"]["n"]
    assert len(reliability["vpt"]["as trained"]["bins"]["counts"]) == 4  # --bins
    if abs(stored_t - 1.0) > 1e-3:  # the stored temperature changes the probabilities, hence the NLL
        assert reliability["vpt"]["calibrated"]["nll"] != reliability["vpt"]["as trained"]["nll"]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # run folder untouched


def test_analyze_refuses_to_write_into_the_run_folder(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", per_class=6)
    config = write_config(tmp_path, data)
    assert invoke("train", "--config", str(config), "--name", "r").exit_code == 0
    run = tmp_path / "runs" / "r"
    result = invoke("analyze", str(run), "--out", str(run))
    assert result.exit_code == 2


def test_bench_methods_writes_the_portrait(tmp_path: Path) -> None:
    out = tmp_path / "eff"
    result = invoke(
        "bench-methods",
        "--methods",
        "linear,vpt",
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--out",
        str(out),
        "--backbone.patch-size",
        "8",
        "--backbone.depth",
        "2",
        "--backbone.embed-dim",
        "32",
        "--backbone.num-heads",
        "2",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "efficiency.json").read_text())
    assert [r["method"] for r in rows] == ["linear", "vpt"]
    assert "vpt" in (out / "efficiency.md").read_text() and (out / "efficiency.png").stat().st_size > 1000
