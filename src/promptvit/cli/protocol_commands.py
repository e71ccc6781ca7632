"""Verbs for benchmark protocols: ``sweep`` (run a protocol x methods x grids YAML) and ``report``.

Registered on the main app by ``register_protocol_commands(app)``; user errors print one line (``cli.output.fail``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from promptvit.cli.output import USER_ERRORS, console, fail


def _parse_vars(pairs: list[str]) -> dict[str, str]:
    from promptvit.errors import ProtocolError

    variables = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name:
            raise ProtocolError(f"--var expects NAME=VALUE, got {pair!r}")
        variables[name] = value
    return variables


def sweep(
    config: Annotated[Path, typer.Argument(help="sweep YAML: protocol, base, methods, grid (see docs)")],
    backend: Annotated[
        str | None, typer.Option(help="inprocess (default), process (local pool) or ray")
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="process backend: parallel workers")] = None,
    results: Annotated[
        Path | None, typer.Option(help="results folder (default: the YAML's, else ./results)")
    ] = None,
    var: Annotated[
        list[str] | None, typer.Option(help="NAME=VALUE for ${NAME} in the YAML (repeatable)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="plan and count the runs, run nothing")] = False,
    report: Annotated[bool, typer.Option(help="render RESULTS/report after the sweep")] = True,
) -> None:
    """Run a protocol sweep: search on validation, then final test runs; re-run to resume after a kill."""
    from rich.table import Table

    from promptvit.protocols import load_sweep_config, run_sweep, write_report

    def on_event(stage: str, spec: Any, status: str, error: str | None, done: int, total: int) -> None:
        style = {"ok": "green", "failed": "bold red", "diverged": "yellow"}.get(status, "dim")
        console.print(
            f"[{stage} {done}/{total}] [{style}]{status}[/] {escape(spec.describe())}"
            + (f": {escape(error)}" if error else ""),
            highlight=False,
        )

    try:
        if backend is not None and backend not in ("inprocess", "process", "ray"):
            raise typer.BadParameter(f"--backend must be inprocess, process or ray, got {backend!r}")
        sweep_config = load_sweep_config(config, _parse_vars(var or []))
        outcome = run_sweep(
            sweep_config,
            results=results,
            backend=backend,  # type: ignore[arg-type]
            workers=workers,
            dry_run=dry_run,
            on_event=on_event,
        )
        rendered = None
        if report and not dry_run:
            rendered = write_report(
                outcome.results, outcome.results / "report", title=sweep_config.title or sweep_config.name
            )
    except (*USER_ERRORS, FileNotFoundError) as error:
        fail(error)
    table = Table(title=escape(f"sweep {sweep_config.name} -> {outcome.results}"))
    for column in ("stage", "planned runs", "outcomes"):
        table.add_column(column)
    for stage in ("search", "final"):
        counts = outcome.counts.get(stage) or {}
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or ("dry run" if dry_run else "-")
        table.add_row(stage, str(outcome.planned.get(stage, 0)), shown)
    console.print(table)
    for line in outcome.unresolved:
        console.print(f"[yellow]not run:[/] {escape(line)}", highlight=False)
    if outcome.failures:
        console.print(f"[bold red]{len(outcome.failures)} failed runs[/] (rerun the same command to retry):")
        for line in outcome.failures[:10]:
            console.print(f"  {line}", highlight=False, markup=False)
    if dry_run and outcome.planned.get("search"):
        console.print(
            "the final runs of searched presets are planned after their search: the final count above covers "
            "only presets with fixed settings until the search has run"
        )
    if rendered is not None:
        console.print(f"report: {rendered.markdown}  {rendered.html}", markup=False, highlight=False)
    if outcome.failures:
        raise typer.Exit(code=1)


def report(
    results: Annotated[
        list[Path],
        typer.Argument(help="sweep results folder(s), .jsonl record files, or `promptvit train` run folders"),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder for report.md/.html, plots")],
    title: Annotated[str, typer.Option(help="report title")] = "promptvit benchmark report",
    plots: Annotated[bool, typer.Option(help="draw plots (matplotlib)")] = True,
    reference: Annotated[
        str | None, typer.Option(help="also show paired differences to this method (besides linear)")
    ] = None,
) -> None:
    """Render paper-style tables (Markdown, HTML, CSV) and plots from sweep records or from plain run
    folders (one run, or a folder of runs such as runs/)."""
    from promptvit.io import output_folder
    from promptvit.protocols import ProtocolError, load_records, write_report
    from promptvit.protocols.report import REPORT_FILES
    from promptvit.protocols.store import record_sources

    try:
        output_folder(out, "report", inputs=record_sources(results), legacy=REPORT_FILES, create=False)
        loaded = load_records(results)
        if not loaded.records:
            raise ProtocolError(
                f"no run records in {', '.join(map(str, results))} ({len(loaded.failures)} failed attempts); "
                "give a sweep's results folder, its .jsonl record files, or promptvit train run folders"
            )
        rendered = write_report(loaded, out, title=title, plots=plots, reference=reference)
    except (*USER_ERRORS, FileNotFoundError) as error:
        fail(error)
    for problem in rendered.loaded.problems:
        console.print(f"[yellow]warning:[/] {escape(problem)}", highlight=False)
    console.print(
        f"{len(rendered.loaded.records)} records, {len(rendered.tables)} tables, {len(rendered.plots)} plots -> "
        f"{rendered.markdown}, {rendered.html}, {rendered.csv}",
        markup=False,
        highlight=False,
    )


def register_protocol_commands(app: typer.Typer) -> None:
    """Add ``sweep`` and ``report`` to ``app``."""
    app.command("sweep")(sweep)
    app.command("report")(report)
