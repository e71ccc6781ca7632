"""What every verb shares: the console, the ``--debug`` switch and the one-line report of a user error.

Verb modules import from here (never from each other), so ``app`` can register them without a cycle.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from promptvit.errors import PromptvitError

# Markup off by default: paths, class names and option values are printed as written (a path holding `[/]`
# would otherwise raise MarkupError, after the work is done). The few styled lines pass markup=True and
# escape whatever the user supplied.
console = Console(stderr=False, markup=False)
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
    console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    console.print(
        "hint: fix the file or option named above; rerun with --debug for the full trace", style="dim"
    )
    raise typer.Exit(code=2)
