"""``promptvit backbones``: the supported timm families and which method runs on which (✓ or the reason).

Registered on the main app by ``register_backbone_commands(app)``.
"""

from __future__ import annotations

from typing import Annotated

import typer


def backbones(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="print the family x method table as Markdown")
    ] = False,
    method: Annotated[list[str] | None, typer.Option(help="only these methods (repeatable)")] = None,
) -> None:
    """List the backbone families and, for every method, ✓ or why it cannot run there (tried on tiny builds)."""
    from rich.table import Table

    from promptvit.cli.output import USER_ERRORS, console, fail
    from promptvit.family_support import family_support, markdown_table

    try:
        rows = family_support(method or None)
    except USER_ERRORS as error:
        fail(error)
    if markdown:
        typer.echo(markdown_table(rows))
        return
    families = Table(title="promptvit backbone families")
    for column in ("family", "timm classes", "tiny builds tried"):
        families.add_column(column, overflow="fold")
    for row in rows:
        families.add_row(row.family, ", ".join(row.timm_classes), ", ".join(row.builds))
    console.print(families)
    support = Table(title="methods per family (✓ or the reason)")
    support.add_column("method")
    for row in rows:
        support.add_column(row.family, overflow="fold")
    for name in rows[0].methods if rows else []:
        support.add_row(name, *(row.methods[name] for row in rows))
    console.print(support)


def register_backbone_commands(app: typer.Typer) -> None:
    """Add ``backbones`` to ``app``."""
    app.command("backbones")(backbones)
