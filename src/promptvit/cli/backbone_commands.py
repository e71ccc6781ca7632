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
    all_classes: Annotated[
        bool,
        typer.Option(
            "--all",
            help="every model class in timm's registry, each wrapped at its smallest architecture built on the "
            "meta device (a few minutes)",
        ),
    ] = False,
) -> None:
    """List the backbone families and, for every method, ✓ or why it cannot run there (tried on tiny builds)."""
    from rich.table import Table

    from promptvit.cli.output import USER_ERRORS, console, fail
    from promptvit.family_support import family_support, markdown_table

    try:
        if all_classes:
            _registry_table(method or None, markdown, console)
            return
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


def _registry_table(methods: list[str] | None, markdown: bool, console) -> None:
    """``--all``: one row per model class of timm's registry (classes with the same cells share a Markdown row)."""
    import timm
    from rich.console import Console
    from rich.table import Table

    from promptvit.family_support import (
        registry_markdown,
        registry_notes,
        registry_support,
        timm_model_classes,
    )

    progress = Console(stderr=True)
    with progress.status("building every registered timm architecture on the meta device..."):
        classes = timm_model_classes()
    with progress.status("") as status:
        rows = registry_support(
            methods, progress=lambda c: status.update(f"wrapping every method on {c.smallest} ({c.name})")
        )
    if markdown:
        typer.echo(registry_markdown(rows))
        return
    cells, notes = registry_notes(rows)
    table = Table(title=f"methods on every model class of timm {timm.__version__} ({len(classes)} classes)")
    for column in ("timm class", "smallest architecture", "family adapter", *rows[0].methods):
        table.add_column(column, overflow="fold")
    for row, row_cells in zip(rows, cells, strict=True):
        table.add_row(row.timm_class.name, row.timm_class.smallest, row.adapter or "none", *row_cells)
    console.print(table)
    for reason, number in notes.items():
        console.print(f"({number}) {reason}", highlight=False)


def register_backbone_commands(app: typer.Typer) -> None:
    """Add ``backbones`` to ``app``."""
    app.command("backbones")(backbones)
