"""Verbs for data sets: ``data check`` (what would block or distort training) and ``data fewshot``.

Registered on the main app by ``register_data_commands(app)``; user errors print one line (``cli.output.fail``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from promptvit.cli.output import (
    USER_ERRORS,
    console,
    csv_options,
    fail,
    file_column_option,
    image_root_option,
    label_column_option,
)

data_app = typer.Typer(help="Check a data set, write K-shot split files.", no_args_is_help=True)


@data_app.command("check")
def check(
    path: Annotated[
        Path, typer.Argument(help="data folder (VTAB-1k task, FGVC data set, MedFMC data set...) or CSV")
    ],
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            "--data-kind",
            help="auto, fewshot (a `data fewshot` folder), vtab, fgvc, medfmc, lists (train.txt/val.txt/"
            "test.txt), splits (train/ val/ test/), folder, csv or npz",
        ),
    ] = "auto",
    dataset: Annotated[
        str | None, typer.Option(help="MedFMC data set when the folder name does not say")
    ] = None,
    image_root: Annotated[str | None, image_root_option()] = None,
    file_column: Annotated[str | None, file_column_option()] = None,
    label_column: Annotated[str | None, label_column_option()] = None,
    input_size: Annotated[
        int, typer.Option(min=0, help="model input size; smaller images are reported (0: off)")
    ] = 224,
    strict: Annotated[bool, typer.Option(help="warnings block too (exit code 1)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Read a data set the way training would and report classes, counts and problems.
    Exit code 0 only when nothing blocks training (1: blocking problems, 2: unreadable data set)."""
    from promptvit.data.check import check_splits, read_layout

    try:
        layout = read_layout(path, kind, dataset, **csv_options(image_root, file_column, label_column))
        report = check_splits(layout, input_size=input_size or None)
    except USER_ERRORS as error:
        fail(error)
    blocking = report.blocking(strict)
    if as_json:
        typer.echo(json.dumps({**report.to_dict(), "ok": not blocking}, indent=2))
    else:
        console.print(escape(report.summary_line()), highlight=False)
        for name, info in report.splits.items():
            balance = info["balance"]
            per_class = (
                ", ".join(f"{c} {n}" for c, n in info["counts"].items())
                if len(info["counts"]) <= 10
                else f"{balance['min']}..{balance['max']}"
            )
            console.print(
                escape(
                    f"  {name}: {info['images']} images, {info['classes_present']}/{info['classes']} classes, "
                    f"per class {per_class}" + (f" (ratio {balance['ratio']})" if balance["ratio"] else "")
                ),
                highlight=False,
            )
        for problem in report.problems:
            style = "bold red" if problem.severity == "error" else "yellow"
            console.print(
                f"[{style}]{problem.severity}[/] {problem.code}: {escape(problem.message)}", highlight=False
            )
        console.print("ok: nothing blocks training" if not blocking else f"{len(blocking)} blocking problems")
    if blocking:
        raise typer.Exit(code=1)


@data_app.command("fewshot")
def fewshot(
    path: Annotated[Path, typer.Argument(help="image folder (<class>/<image>) or CSV")],
    out: Annotated[Path, typer.Option(help="new (or empty) folder for the split files")],
    shots: Annotated[str, typer.Option(help="comma-separated K")] = "1,5,10",
    seeds: Annotated[
        str, typer.Option(help="comma-separated seeds (MedFMC: one exp per seed)")
    ] = "1,2,3,4,5",
    fmt: Annotated[str, typer.Option("--format", help="medfmc or vtab")] = "medfmc",
    name: Annotated[str, typer.Option(help="data set name in the MedFMC file names")] = "data",
    test_fraction: Annotated[float, typer.Option(help="test share per class")] = 0.3,
    val_per_class: Annotated[int, typer.Option(min=1, help="at most this many val images per class")] = 20,
    image_root: Annotated[str | None, image_root_option()] = None,
    file_column: Annotated[str | None, file_column_option()] = None,
    label_column: Annotated[str | None, label_column_option()] = None,
    group_column: Annotated[
        str | None,
        typer.Option(help="CSV: patient/lesion/study column; a group's images stay in one of train, val, test"),
    ] = None,
) -> None:
    """Write K-shot train/val/test split files with a seed, so your own data set gets benchmark-style lists
    (`promptvit data check OUT` checks them all, `promptvit train --data OUT --shots K` trains on one draw)."""
    from promptvit.data import DataError, read_csv, read_image_folder
    from promptvit.data.split_files import write_fewshot_files

    try:
        if not 0 < test_fraction < 1:
            raise DataError(f"--test-fraction {test_fraction} must be between 0 and 1 (the test share per class)")
        try:
            ks = [int(k) for k in shots.split(",")]
            seed_list = [int(s) for s in seeds.split(",")]
        except ValueError:
            raise DataError(
                f"--shots and --seeds take comma-separated integers, got {shots!r} and {seeds!r}"
            ) from None
        if path.suffix.lower() == ".csv":
            samples = read_csv(path, **csv_options(image_root, file_column, label_column), group_column=group_column)
        elif group_column is not None:
            raise DataError(f"--group-column reads a CSV column; {path} is an image folder")
        else:
            samples = read_image_folder(path)
        written = write_fewshot_files(
            samples,
            out,
            shots=ks,
            seeds=seed_list,
            fmt=fmt,
            name=name,
            test_fraction=test_fraction,
            val_per_class=val_per_class,
        )
    except USER_ERRORS as error:
        fail(error)
    console.print(
        escape(f"wrote {len(written)} {fmt} split files to {out} (see {out / 'README.txt'})"), highlight=False
    )


def register_data_commands(app: typer.Typer) -> None:
    """Add the ``data`` group (``data check``, ``data fewshot``) to ``app``."""
    app.add_typer(data_app, name="data")
