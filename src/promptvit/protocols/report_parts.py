"""Pieces every report section shares: metric names, the rendered ``Table``, row labels and plot helpers.

Both the paper-style tables (``report``) and the clinical tables (``clinical_report``) build on these, so
neither imports the other's internals.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptvit.io import atomic_write

METRIC_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "map": "mAP",
    "map_present": "mAP (classes with positives)",
    "auc": "AUC",
}

def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


@dataclass
class Table:
    """A rendered table: header, rows of strings, and notes printed under it."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        def cell(text: str) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")

        lines = [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(cell(c) for c in self.columns) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|")
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in self.rows
        )
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return (
            f"<table><caption>{html.escape(self.title)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>" + (f"<ul class='notes'>{notes}</ul>" if notes else "")
        )


def shots_label(shots: int | None) -> str:
    return "" if shots is None else f" {shots}-shot"


def row_label(record: dict[str, Any]) -> str:
    """Table row of a record: the method label, plus its arm (e.g. ``[prompt_length=10]``) if it has one."""
    arm = (record.get("tags") or {}).get("arm")
    if not arm:
        return record["method"]
    return f"{record['method']} [" + ", ".join(f"{k}={v}" for k, v in arm.items()) + "]"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "plot"


def save_png(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return path


def subplots(count: int) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]
