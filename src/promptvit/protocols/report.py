"""Paper-style reports from run records: Markdown and HTML tables, a CSV of every cell, and plots.

Only **final-stage records evaluated on the test set** enter the tables (search runs are validation-only).
For every (protocol, backbone) the main table has one row per method and one column per task (and K):

* a cell is ``mean ± std`` of the runs' test scores (percentages), std being the sample standard deviation
  (n - 1) over the seeds / official exps; a cell with one run shows the value alone;
* **average** = the unweighted mean of the method's cell means (MedFMC: the 9-task average of EPT Table 1),
  given only when the method has every cell;
* **vs linear** = (average_method - average_linear) / average_linear x 100, the *relative* change in
  percent as in EPT Table 1 (not a difference in points);
* VTAB-1k: per-group means (natural, specialized, structured), the mean over all tasks and the mean of
  the group means, each labelled;
* parameter counts (method parameters without the head, and all tuned parameters with the head) beside
  the scores.

Further tables: secondary test metrics (AUC, balanced accuracy), how every number was selected, and
failed or diverged runs. Plots (matplotlib, Agg): score vs shots, vs prompt length, vs prompted depth.
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptvit.io import atomic_write_text, output_folder
from promptvit.methods import baseline_method, methods_in_table_order
from promptvit.protocols.clinical_report import clinical_tables, reliability_plots
from promptvit.protocols.report_parts import (
    Table,
    metric_name,
    row_label,
    save_png,
    shots_label,
    slug,
    subplots,
)
from promptvit.protocols.store import LoadedRecords, load_records, record_sources

SECONDARY_METRICS = ("auc", "balanced_accuracy", "map_present")


@dataclass
class Cell:
    values: list[float]
    diverged: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self) -> str:
        if not self.values:
            return "diverged" if self.diverged else "—"
        shown = f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"
        return shown + (f" ({self.diverged} diverged)" if self.diverged else "")


def fmt_pct_change(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}%"


def _fmt_count(values: list[int]) -> str:
    if not values:
        return "—"
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def _order(items: Iterable[str], preferred: tuple[str, ...] | None) -> list[str]:
    seen = list(dict.fromkeys(items))
    if not preferred:
        return seen
    rank = {t: i for i, t in enumerate(preferred)}
    return sorted(seen, key=lambda t: (rank.get(t, len(rank)), seen.index(t)))


def _task_order(protocol: str) -> tuple[str, ...] | None:
    from promptvit.protocols.fgvc import FGVCProtocol
    from promptvit.protocols.medfmc import MedFMCProtocol
    from promptvit.protocols.vtab import VTABProtocol

    known = {"medfmc": MedFMCProtocol, "vtab": VTABProtocol, "fgvc": FGVCProtocol}.get(protocol)
    return known.task_order if known is not None else None


def _slot(record: dict[str, Any]) -> tuple:
    return (
        record["protocol"],
        record.get("backbone", ""),
        row_label(record),
        record["task"],
        record.get("shots"),
        record.get("split"),
        record.get("seed"),
    )


def final_records(
    records: Iterable[dict[str, Any]], problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """Records that may appear in tables: final stage, evaluated on test, ok or diverged.

    Two records of the same slot (protocol, backbone, method, task, K, split, seed) with different configs
    (e.g. the YAML changed between sweeps) would count twice in a cell: the newest is kept, the others are
    reported in ``problems``.
    """
    newest: dict[tuple, dict[str, Any]] = {}
    superseded = 0
    for r in records:
        if not (
            r.get("stage") == "final"
            and r.get("evaluated_on", "test") == "test"
            and r.get("status") in ("ok", "diverged")
        ):
            continue
        slot = _slot(r)
        if slot in newest:
            superseded += 1
            if str(r.get("finished_at", "")) <= str(newest[slot].get("finished_at", "")):
                continue
        newest[slot] = r
    if superseded and problems is not None:
        problems.append(
            f"{superseded} final record(s) superseded by a newer record of the same method, task, K, split and "
            "seed (another config, e.g. an edited YAML); only the newest of each is in the tables"
        )
    return list(newest.values())


@dataclass
class Group:
    """All final records of one (protocol, backbone): the unit of one set of tables."""

    protocol: str
    backbone: str
    records: list[dict[str, Any]]

    @property
    def methods(self) -> list[str]:
        """Rows: the baseline first, then the sweep's method order (notes), else the registry's table order."""
        rank: dict[str, tuple] = {}
        order, baseline = methods_in_table_order(), baseline_method()
        for r in self.records:
            label = row_label(r)
            base = re.split(r"[.\- \[]", r["method"], maxsplit=1)[0]
            known = order.index(base) if base in order else len(order)
            key = (label != baseline, (r.get("notes") or {}).get("method_rank", 10**6), known, label)
            rank[label] = min(rank.get(label, key), key)
        return sorted(rank, key=rank.__getitem__)

    @property
    def columns(self) -> list[tuple[str, int | None]]:
        by_rank = sorted(self.records, key=lambda r: (r.get("notes") or {}).get("task_rank", 10**6))
        tasks = _order((r["task"] for r in by_rank), _task_order(self.protocol))
        columns = []
        for task in tasks:
            shots = sorted(
                {r.get("shots") for r in self.records if r["task"] == task},
                key=lambda s: (s is not None, s or 0),
            )
            columns += [(task, s) for s in shots]
        return columns

    def metric_of(self, task: str) -> str:
        metrics = [r.get("metric") for r in self.records if r["task"] == task and r.get("metric")]
        return max(set(metrics), key=metrics.count) if metrics else "score"

    def cell(self, method: str, task: str, shots: int | None, metric: str | None = None) -> Cell:
        cell = Cell(values=[])
        for r in self.records:
            if row_label(r) != method or r["task"] != task or r.get("shots") != shots:
                continue
            if r.get("status") != "ok":
                cell.diverged += 1
                continue
            value = r.get("score") if metric is None else (r.get("metrics") or {}).get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                cell.values.append(float(value))
        return cell


def group_records(records: Iterable[dict[str, Any]], problems: list[str] | None = None) -> list[Group]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in final_records(records, problems):
        groups[(record["protocol"], record.get("backbone", ""))].append(record)
    return [Group(p, b, rs) for (p, b), rs in groups.items()]


def _average(group: Group, method: str, columns: list[tuple[str, int | None]]) -> float | None:
    means = [group.cell(method, t, s).mean for t, s in columns]
    if not means or any(m is None for m in means):
        return None
    return statistics.fmean(means)  # type: ignore[arg-type]


def relative_change(value: float | None, baseline: float | None) -> float | None:
    """(value - baseline) / baseline x 100 (EPT Table 1's percentage vs linear probing)."""
    if value is None or baseline is None or baseline == 0:
        return None
    return (value - baseline) / baseline * 100.0


def _params(group: Group, method: str) -> tuple[str, str]:
    rows = [r.get("parameters") or {} for r in group.records if row_label(r) == method]
    return _fmt_count([p["method"] for p in rows if "method" in p]), _fmt_count(
        [p["tuned"] for p in rows if "tuned" in p]
    )


def _runs_note(group: Group) -> str:
    counts = sorted({group.cell(m, t, s).n for m in group.methods for t, s in group.columns} - {0})
    what = "official exps x seeds" if group.protocol == "medfmc" else "seeds"
    return f"runs per cell ({what}): {', '.join(map(str, counts)) or '—'}"


def main_table(group: Group) -> Table:
    columns = group.columns
    vtab = group.protocol == "vtab"
    header = ["method", "params (method)", "tuned params (with head)"]
    header += [f"{t}{shots_label(s)} ({metric_name(group.metric_of(t))})" for t, s in columns]
    group_cols: list[tuple[str, list[tuple[str, int | None]]]] = []
    if vtab:
        from promptvit.protocols.vtab import VTAB_GROUPS

        for name, tasks in VTAB_GROUPS.items():
            present = [(t, s) for t, s in columns if t in tasks]
            if present:
                group_cols.append((f"{name} mean ({len(present)} of {len(tasks)} tasks)", present))
        header += [name for name, _ in group_cols]
        header += [f"mean of {len(columns)} tasks", "mean of group means"]
    else:
        header += [f"average ({len(columns)} columns)"]
    header += ["vs linear (relative %)"]
    baseline = baseline_method()
    baseline_avg = _average(group, baseline, columns) if baseline in group.methods else None
    rows = []
    for method in group.methods:
        row = [method, *_params(group, method)]
        row += [group.cell(method, t, s).text() for t, s in columns]
        average = _average(group, method, columns)
        if vtab:
            group_means = [_average(group, method, cols) for _, cols in group_cols]
            row += ["—" if g is None else f"{g:.2f}" for g in group_means]
            row.append("—" if average is None else f"{average:.2f}")
            mean_of_groups = (
                None
                if any(g is None for g in group_means) or not group_means
                else statistics.fmean(group_means)
            )  # type: ignore[arg-type]
            row.append("—" if mean_of_groups is None else f"{mean_of_groups:.2f}")
        else:
            row.append("—" if average is None else f"{average:.2f}")
        row.append(fmt_pct_change(relative_change(average, baseline_avg)))
        rows.append(row)
    notes = [
        "test scores in %, mean ± sample standard deviation (n − 1) over runs; one run: the value alone",
        _runs_note(group),
        "average: unweighted mean of the method's cell means, only when it has every cell",
        "vs linear: (average − linear average) / linear average × 100, the relative change as in EPT Table 1"
        + ("" if baseline_avg is not None else " (no complete 'linear' row here, so not computed)"),
        "params (method): parameters the method adds or unfreezes, head excluded; tuned: all trained parameters",
    ]
    random_init = sum(_random_backbone(r) for r in group.records)
    if random_init:
        notes.insert(
            0,
            f"WARNING: {random_init} of {len(group.records)} runs used a randomly initialised backbone "
            "(no pretrained or local weights); their scores say little about a pretrained model",
        )
    if vtab:
        notes.append(
            "VTAB-1k: group means average the group's tasks; 'mean of N tasks' weights every task equally, "
            "'mean of group means' weights the three groups equally; 'vs linear' uses the mean of N tasks"
        )
    title = f"{group.protocol} — backbone {group.backbone}: test {', '.join(sorted({metric_name(group.metric_of(t)) for t, _ in columns}))}"
    return Table(title=title, columns=header, rows=rows, notes=notes)


def secondary_tables(group: Group) -> list[Table]:
    tables = []
    columns = group.columns
    for metric in SECONDARY_METRICS:
        present = [
            (t, s)
            for t, s in columns
            if group.metric_of(t) != metric
            and any(
                isinstance((r.get("metrics") or {}).get(metric), (int, float))
                for r in group.records
                if r["task"] == t
            )
        ]
        if not present:
            continue
        header = [
            "method",
            *[f"{t}{shots_label(s)}" for t, s in present],
            f"average ({len(present)} columns)",
        ]
        rows = []
        for method in group.methods:
            cells = [group.cell(method, t, s, metric) for t, s in present]
            means = [c.mean for c in cells]
            average = None if any(m is None for m in means) else statistics.fmean(means)  # type: ignore[arg-type]
            rows.append([method, *[c.text() for c in cells], "—" if average is None else f"{average:.2f}"])
        tables.append(
            Table(
                title=f"{group.protocol} — backbone {group.backbone}: test {metric_name(metric)} (secondary metric)",
                columns=header,
                rows=rows,
                notes=["same runs as the main table; mean ± sample std (n − 1)"],
            )
        )
    return tables


def _random_backbone(record: dict[str, Any]) -> bool:
    """Whether the run's backbone had neither hub weights nor a weights file (unknown records: False)."""
    if "backbone_init" in record:
        return record["backbone_init"] == "random"
    backbone = ((record.get("spec") or {}).get("config") or {}).get("backbone")
    return isinstance(backbone, dict) and not (backbone.get("pretrained") or backbone.get("weights"))


def _hp_text(record: dict[str, Any]) -> str:
    """lr, weight decay and method options of the run; '*' marks those chosen by the search."""
    hparams = record.get("hparams") or {}
    searched = {k.split(".", 1)[-1] for k in hparams}
    config = (record.get("spec") or {}).get("config") or {}
    values: dict[str, Any] = {}
    if config:
        train = config.get("train") or {}
        values = {"lr": train.get("lr"), "weight_decay": train.get("weight_decay")}
        values.update((config.get("method") or {}).get("options") or {})
    values.update({k.split(".", 1)[-1]: v for k, v in hparams.items()})
    text = ", ".join(f"{k}={v}" + ("*" if k in searched else "") for k, v in values.items())
    return text or "(defaults)"


def selection_table(group: Group) -> Table:
    rows = []
    seen: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in group.records:
        seen[(row_label(r), r["task"], r.get("shots"), _hp_text(r))].append(r)
    method_rank = {m: i for i, m in enumerate(group.methods)}
    column_rank = {c: i for i, c in enumerate(group.columns)}
    ordered = sorted(
        seen.items(), key=lambda kv: (method_rank[kv[0][0]], column_rank[(kv[0][1], kv[0][2])], kv[0][3])
    )
    for (method, task, shots, hp), records in ordered:
        selection = records[0].get("selection") or {}
        rows.append(
            [
                method,
                f"{task}{shots_label(shots)}",
                hp,
                selection.get("hyperparameters_split", "?"),
                selection.get("epoch_split", "?"),
                str(len(records)),
            ]
        )
    return Table(
        title=f"{group.protocol} — backbone {group.backbone}: how each number was selected",
        columns=[
            "method",
            "task",
            "settings (* = chosen by the search)",
            "hyperparameters chosen on",
            "epoch chosen on",
            "runs",
        ],
        rows=rows,
        notes=[
            "the test set is never used for any selection; 'last epoch' = no epoch selection; "
            "'none (fixed)' = set in the config, not searched"
        ],
    )


def problem_table(loaded: LoadedRecords) -> Table | None:
    rows = [
        [
            f.get("stage", "?"),
            f.get("method", "?"),
            str(f.get("task", "?")),
            str(f.get("shots")),
            str(f.get("split")),
            "failed",
            str(f.get("error", ""))[:200],
        ]
        for f in loaded.failures
    ]
    rows += [
        [
            r.get("stage", "?"),
            r.get("method", "?"),
            str(r.get("task")),
            str(r.get("shots")),
            str(r.get("split")),
            "diverged",
            str(r.get("error", ""))[:200],
        ]
        for r in loaded.records
        if r.get("status") == "diverged"
    ]
    rows += [["", "", "", "", "", "store", problem] for problem in loaded.problems]
    if not rows:
        return None
    return Table(
        title="failed or diverged runs, and store problems",
        columns=["stage", "method", "task", "K", "split", "status", "error"],
        rows=rows,
        notes=[
            "failed runs are retried by the next sweep; diverged runs (non-finite loss) are final outcomes"
        ],
    )


def build_tables(records: Iterable[dict[str, Any]], reference: str | None = None) -> list[Table]:
    """Main, secondary-metric and selection tables for every (protocol, backbone) in ``records``, then the
    clinical-evaluation tables (paired differences to the baseline and to ``reference``)."""
    tables = []
    for group in group_records(records):
        tables.append(main_table(group))
        tables += secondary_tables(group)
        tables.append(selection_table(group))
        tables += clinical_tables(group, reference)
    return tables


def summary_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per table cell (protocol, backbone, method, task, shots, metric, n, mean, std)."""
    rows = []
    for group in group_records(records):
        for method in group.methods:
            for task, shots in group.columns:
                cell = group.cell(method, task, shots)
                rows.append(
                    {
                        "protocol": group.protocol,
                        "backbone": group.backbone,
                        "method": method,
                        "task": task,
                        "shots": "" if shots is None else shots,
                        "metric": group.metric_of(task),
                        "n": cell.n,
                        "diverged": cell.diverged,
                        "mean": "" if cell.mean is None else f"{cell.mean:.4f}",
                        "std": "" if cell.std is None else f"{cell.std:.4f}",
                    }
                )
    return rows


# ----------------------------------------------------------------------------------------------- plots


def plot_vs_shots(group: Group, out: Path) -> Path | None:
    tasks = list(dict.fromkeys(t for t, _ in group.columns))
    shots_by_task = {t: [s for tt, s in group.columns if tt == t and s is not None] for t in tasks}
    tasks = [t for t in tasks if len(shots_by_task[t]) > 1]
    if not tasks:
        return None
    import matplotlib.pyplot as plt

    fig, axes = subplots(len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        shots = shots_by_task[task]
        for method in group.methods:
            cells = [group.cell(method, task, s) for s in shots]
            xs = [s for s, c in zip(shots, cells, strict=True) if c.mean is not None]
            if not xs:
                continue
            ys = [c.mean for c in cells if c.mean is not None]
            errs = [c.std or 0.0 for c in cells if c.mean is not None]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots)
        ax.set_xticklabels([str(s) for s in shots])
        ax.set_xlabel("training images per class, K (shots)")
        ax.set_ylabel(f"test {metric_name(group.metric_of(task))} (%)")
        ax.set_title(task)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small", title="method")
    fig.suptitle(f"{group.protocol}, {group.backbone}: test score vs shots (mean ± std over runs)")
    fig.tight_layout()
    path = save_png(fig, out / f"{slug(group.protocol + '-' + group.backbone)}-vs-shots.png")
    plt.close(fig)
    return path


_OPTION_LABELS = {
    "prompt_length": "prompt length (tokens; EPT: prompt columns d_p)",
    "prompted_depth": "prompted blocks (depth)",
}


def plot_vs_option(records: list[dict[str, Any]], option: str, out: Path, stem: str) -> Path | None:
    """Score vs ``option`` (a record field such as prompt_length or prompted_depth) where it varies."""
    series: dict[tuple, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        x = r.get(option)
        if (
            r.get("status") == "ok"
            and isinstance(x, (int, float))
            and isinstance(r.get("score"), (int, float))
        ):
            series[(r["task"], r.get("shots"), r.get("metric", "score"), r["method"])][x].append(
                float(r["score"])
            )
    panels: dict[tuple, list[tuple[str, dict[Any, list[float]]]]] = defaultdict(list)
    for (task, shots, metric, method), points in series.items():
        if len(points) > 1:
            panels[(task, shots, metric)].append((method, points))
    if not panels:
        return None
    import matplotlib.pyplot as plt

    split = "test" if all(r.get("evaluated_on") == "test" for r in records) else "validation"
    keys = list(panels)
    fig, axes = subplots(len(keys))
    for ax, (task, shots, metric) in zip(axes, keys, strict=True):
        for method, points in panels[(task, shots, metric)]:
            xs = sorted(points)
            ys = [statistics.fmean(points[x]) for x in xs]
            errs = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=method)
        values = sorted({x for _, p in panels[(task, shots, metric)] for x in p})
        if option == "prompt_length" and max(values) > 20 * max(min(values), 1):
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(values)
        ax.set_xticklabels([f"{v:g}" for v in values])
        ax.set_xlabel(_OPTION_LABELS.get(option, option))
        ax.set_ylabel(f"{split} {metric_name(metric)} (%)")
        ax.set_title(f"{task}{shots_label(shots)}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", title="method")
    fig.suptitle(f"{split} score vs {_OPTION_LABELS.get(option, option)} (mean ± std over runs)")
    fig.tight_layout()
    path = save_png(fig, out / f"{stem}-vs-{option.replace('_', '-')}.png")
    plt.close(fig)
    return path


def make_plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Score vs shots per (protocol, backbone); vs prompt length and prompted depth from test records where
    those vary, else from the search stage's validation records (labelled 'validation')."""
    paths: list[Path] = []
    for group in group_records(records):
        path = plot_vs_shots(group, out)
        if path:
            paths.append(path)
        paths += reliability_plots(group, out)
    final = final_records(records)
    search = [r for r in records if r.get("stage") == "search" and r.get("status") == "ok"]
    for option in ("prompt_length", "prompted_depth"):
        path = plot_vs_option(final, option, out, "test") or plot_vs_option(search, option, out, "validation")
        if path:
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- output

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:110em}table{border-collapse:collapse;
margin:1em 0}caption{font-weight:bold;text-align:left;padding:.4em 0}td,th{border:1px solid #bbb;
padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}th{background:#eee}
.notes{font-size:.9em;color:#444}img{max-width:100%}"""


@dataclass
class Report:
    markdown: Path
    html: Path
    csv: Path
    plots: list[Path]
    tables: list[Table]
    loaded: LoadedRecords


#: what a report folder holds; an older promptvit wrote these before folders were marked
REPORT_FILES = ("report.md", "report.html", "summary.csv", "plots")


def write_report(
    results: str | Path | Iterable[str | Path] | LoadedRecords,
    out_dir: str | Path,
    *,
    title: str = "promptvit benchmark report",
    header: list[str] | None = None,
    plots: bool = True,
    reference: str | None = None,
) -> Report:
    """Render ``results`` (store folders, .jsonl files or loaded records) into ``out_dir``:
    ``report.md``, ``report.html``, ``summary.csv`` and ``plots/*.png``; every file written atomically.
    ``reference``: a method row label that paired differences are also shown against (besides linear)."""
    inputs = [] if isinstance(results, LoadedRecords) else record_sources(results)
    loaded = results if isinstance(results, LoadedRecords) else load_records(results)
    out = output_folder(out_dir, "report", inputs=inputs, legacy=REPORT_FILES)  # new, empty or a report
    final_records(loaded.records, loaded.problems)  # reports superseded records
    tables = build_tables(loaded.records, reference)
    problems = problem_table(loaded)
    plot_paths = make_plots(loaded.records, out / "plots") if plots else []
    n_final = len(final_records(loaded.records))
    intro = [
        f"{n_final} final runs (test) and {len(loaded.records) - n_final} search-stage runs (validation only) "
        f"in {len(loaded.records)} records; {len(loaded.failures)} failed attempts.",
        "Scores are test-set percentages. Hyperparameters were chosen on validation splits (or fixed), epochs "
        "on validation or at the last epoch, as each table's selection table says; the test set was never "
        "used for selection.",
    ]
    random = [r for r in loaded.records if _random_backbone(r)]
    if random:
        intro.append(
            f"WARNING: {len(random)} of {len(loaded.records)} runs trained on a randomly initialised backbone "
            "(no pretrained weights or weights file): their scores say nothing about transfer."
        )
    md = [f"# {title}", ""]
    md += [f"{line}  " for line in header or []]
    md += ["", *intro, ""]
    body_html = [f"<h1>{html.escape(title)}</h1>"]
    body_html += [f"<p>{html.escape(line)}</p>" for line in [*(header or []), *intro]]
    all_tables = tables + ([problems] if problems else [])
    for table in all_tables:
        md += [table.to_markdown(), ""]
        body_html.append(table.to_html())
    if not tables:
        md += ["No final-stage test records yet: run the sweep's final stage first.", ""]
        body_html.append("<p>No final-stage test records yet.</p>")
    if plot_paths:
        md.append("## Plots\n")
        body_html.append("<h2>Plots</h2>")
        for path in plot_paths:
            rel = path.relative_to(out).as_posix()
            md.append(f"![{path.stem}]({rel})\n")
            body_html.append(
                f"<figure><img src='{html.escape(rel)}' alt='{html.escape(path.stem)}'></figure>"
            )
    md_path = atomic_write_text(out / "report.md", "\n".join(md).rstrip() + "\n")
    html_path = atomic_write_text(
        out / "report.html",
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body_html)
        + "</body></html>\n",
    )
    buffer = io.StringIO()
    rows = summary_rows(loaded.records)
    fields = ["protocol", "backbone", "method", "task", "shots", "metric", "n", "diverged", "mean", "std"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = atomic_write_text(out / "summary.csv", buffer.getvalue())
    return Report(
        markdown=md_path, html=html_path, csv=csv_path, plots=plot_paths, tables=all_tables, loaded=loaded
    )
