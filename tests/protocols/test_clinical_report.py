"""Clinical report sections against hand-computed values on synthetic records."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from scipy import stats

from promptvit.protocols import build_tables, write_report
from promptvit.protocols.store import LoadedRecords
from tests.protocols.test_report import rec


def _clinical(score: float, ece: float, ece_after: float, seed: int) -> dict:
    bins = {"counts": [0, 10, 10], "confidence": [None, 0.5, 0.9], "accuracy": [None, 0.6, 0.7]}
    return {
        "accuracy": score,
        "ece": ece,
        "ece_mass": ece + 1,
        "nll": 0.7,
        "brier": 0.4,
        "reliability": bins,
        "calibration": {"kind": "temperature", "temperature": 1.5 + seed},
        "calibrated": {
            "ece": ece_after,
            "ece_mass": ece_after + 1,
            "nll": 0.6,
            "brier": 0.35,
            "reliability": bins,
        },
        "ci": {"low": score - 3, "high": score + 4, "group_rule": "CSV column lesion_id"},
        "thresholds": {
            "rule": "youden",
            "classes": {
                "pneumonia": {
                    "threshold": 0.4,
                    "sensitivity": 80.0,
                    "specificity": 60.0 + seed,
                    "ppv": 70.0,
                    "npv": 75.0,
                    "confusion": {"tp": 8, "fp": 2, "fn": 2, "tn": 8},
                }
            },
        },
    }


LINEAR = [70.0, 72.0, 69.0, 71.0, 73.0, 70.5]
EPT = [74.0, 75.5, 71.0, 76.0, 75.0, 73.0]  # always above linear: resolved
VPT = [69.0, 74.0, 68.0, 72.5, 72.0, 71.0]  # mixed: not resolved


def records() -> list[dict]:
    out = []
    for method, scores in (("linear", LINEAR), ("ept", EPT), ("vpt", VPT)):
        for seed, score in enumerate(scores):
            out.append(
                rec(
                    method,
                    "pneumonia",
                    10,
                    score,
                    seed,
                    protocol="fewshot",
                    metric="accuracy",
                    metrics=_clinical(score, 10.0 + seed, 4.0, seed),
                )
            )
    return out


def _table(tables, part: str):
    return next(t for t in tables if part in t.title)


def test_paired_differences_match_hand_computation() -> None:
    tables = build_tables(records(), reference="vpt")
    paired = _table(tables, "paired difference of test accuracy to linear")
    rows = {row[0]: row for row in paired.rows}
    d = [e - lin for e, lin in zip(EPT, LINEAR, strict=True)]
    low, high = stats.t.interval(0.95, len(d) - 1, loc=statistics.fmean(d), scale=stats.sem(d))
    assert rows["ept"][1] == "6"
    assert rows["ept"][2] == f"{statistics.fmean(d):.2f} [{low:.2f}, {high:.2f}]"
    assert rows["ept"][3] == f"{stats.wilcoxon(d).pvalue:.3f}"
    assert rows["ept"][4] == f"{2 / 64:.3f}"  # all six differences positive: exact sign-flip p = 2/2^6
    assert rows["ept"][5] == "yes" and rows["vpt"][5] == "no"
    assert int(rows["vpt"][6]) > 6
    against_vpt = _table(tables, "to vpt")
    assert {row[0] for row in against_vpt.rows} == {"linear", "ept"}


def test_calibration_table_before_after_and_ci() -> None:
    table = _table(build_tables(records()), "calibration before")
    row = next(r for r in table.rows if r[0] == "linear")
    mean = statistics.fmean(LINEAR)
    half = stats.t.ppf(0.975, 5) * statistics.stdev(LINEAR) / len(LINEAR) ** 0.5
    assert row[2] == f"{mean:.2f} [{mean - half:.2f}, {mean + half:.2f}] t"
    assert row[3] == "7.00"  # every per-run bootstrap CI is 7 points wide
    assert row[4] == f"{statistics.fmean(10.0 + s for s in range(6)):.2f} → 4.00"
    assert row[8] == f"{statistics.median(1.5 + s for s in range(6)):.2f}"
    assert any("lesion_id" in note for note in table.notes)


def test_threshold_table_and_reliability_plot(tmp_path: Path) -> None:
    report = write_report(LoadedRecords(records=records()), tmp_path)
    table = _table(report.tables, "decision threshold")
    row = next(r for r in table.rows if r[0] == "ept")
    assert (
        row[1] == "pneumonia"
        and row[3] == "80.00"
        and row[4] == f"{statistics.fmean(60 + s for s in range(6)):.2f}"
    )
    assert row[7] == "8.0 / 2.0 / 2.0 / 8.0"
    plots = [p for p in report.plots if p.name.endswith("reliability.png")]
    assert plots and plots[0].stat().st_size > 1000
    assert "paired difference" in report.markdown.read_text()


def test_records_without_clinical_metrics_get_no_clinical_tables() -> None:
    plain = [rec("linear", "chest", 1, 10.0 + i, i) for i in range(3)]
    assert not [t for t in build_tables(plain) if "paired" in t.title or "calibration" in t.title]


@pytest.mark.parametrize("missing", ["vpt", "nonexistent"])
def test_reference_absent_from_a_group_is_skipped(missing: str) -> None:
    few = [r for r in records() if r["method"] != "vpt"]
    titles = [t.title for t in build_tables(few, reference=missing)]
    assert not any(f"to {missing}" in t for t in titles)


def test_report_cli_reference_option(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from promptvit.cli.protocol_commands import register_protocol_commands
    from tests.protocols.test_report import records_to_file

    app = typer.Typer()
    register_protocol_commands(app)
    path = records_to_file(tmp_path, records())
    args = ["report", str(path), "--out", str(tmp_path / "out"), "--no-plots", "--reference", "vpt"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "report.md").read_text()
    assert "paired difference of test accuracy to vpt" in text and "to linear" in text


def test_the_report_states_the_runs_own_evaluation_settings(tmp_path: Path) -> None:
    """Bins, resamples and CI level come from the records; runs with other bins are left out of the pooled
    reliability diagram instead of breaking it."""
    rows = records()
    for r in rows:
        r["metrics"]["ci"].update(level=0.8, resamples=200)
    four_bins = {"counts": [5, 5, 5, 5], "confidence": [0.1, 0.3, 0.6, 0.9], "accuracy": [0.2, 0.3, 0.5, 0.8]}
    rows[0]["metrics"]["reliability"] = four_bins
    table = _table(build_tables(rows), "calibration before")
    notes = " ".join(table.notes)
    assert "200 resamples" in notes and "3/4 bins" in notes
    assert any("80% CI width" in column for column in table.columns)
    assert write_report(LoadedRecords(records=rows), tmp_path).markdown.is_file()


def test_an_interval_over_two_draws_stays_within_0_and_100() -> None:
    """Two accuracy draws far apart: a t interval would read [-6.9, 116.6]; the bootstrap stays in range."""
    from promptvit.protocols.stats import mean_interval

    two = [
        rec(
            m,
            "pneumonia",
            10,
            s,
            seed,
            protocol="fewshot",
            metric="accuracy",
            metrics=_clinical(s, 10, 4, seed),
        )
        for m in ("linear",)
        for seed, s in enumerate((45.0, 64.72))
    ]
    row = next(r for r in _table(build_tables(two), "calibration before").rows if r[0] == "linear")
    low, high = (float(x) for x in row[2].split("[")[1].split("]")[0].split(","))
    assert 0 <= low <= high <= 100 and row[2].endswith("bootstrap")
    assert (low, high) == (45.0, 64.72)  # the bootstrap of a 2-draw mean spans the two draws
    half = stats.t.ppf(0.975, 1) * statistics.stdev([45.0, 64.72]) / 2**0.5
    assert statistics.fmean([45.0, 64.72]) - half < 0  # what the t interval would have said
    near_top = mean_interval([99.0, 100.0, 92.0])  # a t interval would cross 100
    assert near_top["method"] == "bootstrap" and 92.0 <= near_top["low"] <= near_top["high"] <= 100.0
    assert mean_interval([70.0, 72.0, 71.0])["method"] == "t"
