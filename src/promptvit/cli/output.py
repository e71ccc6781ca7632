"""What every verb shares: the console, the ``--debug`` switch, the one-line report of a user error and the
options of every verb that reads a data set (the same names and meaning everywhere).

Verb modules import from here (never from each other), so ``app`` can register them without a cycle.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn, TextIO

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


#: exit status when the reader of stdout leaves early (``promptvit ... | head``): 128 + SIGPIPE, what a shell
#: reports for the tools SIGPIPE stops; 1 would read as a failed verb (``data check``: blocking problems)
CLOSED_OUTPUT_EXIT = 141


class _ClosedOutputGuard:
    """``sys.stdout`` (or stderr) whose write or flush into a pipe nobody reads any more ends promptvit quietly.

    Python's recipe for ``BrokenPipeError`` (signal module docs, "Note on SIGPIPE"): point the descriptor at
    ``os.devnull``, so the flush at exit has nowhere to fail, and exit. Done here, under rich and click (which
    would exit 1), so every verb and every way of printing ends the same way, with ``CLOSED_OUTPUT_EXIT``.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _reader_gone(self) -> NoReturn:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        raise SystemExit(CLOSED_OUTPUT_EXIT)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_output() -> None:
    """Make a reader of stdout or stderr that leaves early end promptvit quietly (``_ClosedOutputGuard``;
    stderr for ``2>&1 | head``, where progress bars write); the entry point calls it."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _ClosedOutputGuard):
            setattr(sys, name, _ClosedOutputGuard(stream))


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
