"""What every verb shares: the console, the ``--debug`` switch, the one-line report of a user error and the
options of every verb that reads a data set (the same names and meaning everywhere).

Verb modules import from here (never from each other), so ``app`` can register them without a cycle.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from promptvit.errors import PromptvitError

console = Console(stderr=False)
state = {"debug": False}

#: what a verb reports as one line: every promptvit error, and pydantic's for a bad config file
USER_ERRORS: tuple[type[BaseException], ...] = (PromptvitError, ValidationError)


def fail(error: BaseException) -> NoReturn:
    """Print ``error`` as one line plus a hint and exit with code 2 (re-raise it under ``--debug``)."""
    if state["debug"]:
        raise error
    if isinstance(error, ValidationError):
        lines = [
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in error.errors()
        ]
        message = "invalid config: " + "; ".join(lines)
    else:
        message = str(error)
    # soft_wrap keeps paths copyable; escaping keeps '[' in paths and hints ('promptvit[ray]') as written
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    console.print(
        "hint: fix the file or option named above; rerun with --debug for the full trace", style="dim"
    )
    raise typer.Exit(code=2)


DATA_KIND_HELP = (
    "the data's layout, detected unless given: folder, csv, npz, fewshot (a `data fewshot` folder), lists "
    "(train.txt/val.txt/test.txt), splits (train/ val/ test/ folders), vtab, fgvc, medfmc or digits"
)


def image_root_option() -> object:
    return typer.Option(help="CSV: the folder its file names are relative to (default: the CSV's folder)")


def file_column_option() -> object:
    return typer.Option(help="CSV: the column of file names (default: file)")


def label_column_option() -> object:
    return typer.Option(help="CSV: the column of labels (default: label)")


def csv_options(image_root: str | None, file_column: str | None, label_column: str | None) -> dict[str, str]:
    """The CSV options given on the command line, as ``data.*`` keys of a run config."""
    given = {"image_root": image_root, "file_column": file_column, "label_column": label_column}
    return {k: v for k, v in given.items() if v is not None}
