"""Verb ``export``: write an artifact as a peft adapter, a plain timm checkpoint or an ONNX model.

Registered on the main app by ``register_export_commands(app)``; user errors print one line (``_fail``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export(
    artifact: Annotated[Path, typer.Argument(help="artifact folder (or run folder)")],
    format: Annotated[str, typer.Option("--format", "-f", help="peft, onnx or merged-timm")],
    out: Annotated[Path, typer.Option(help="new (or empty) folder for the exported files")],
) -> None:
    """Export a trained artifact for other tools; the export is loaded back and its logits checked."""
    from promptvit.cli.app import _fail, _user_errors, console
    from promptvit.export import ExportError, export

    try:
        record = export(artifact, out, format)
    except (*_user_errors(), ExportError) as error:
        _fail(error)
    tolerance = record["tolerance"]
    console.print(
        f"wrote {format} export of '{record['method']}' to {out}: {', '.join(record['files'])}; "
        f"logits match the tuned model (max abs diff {record['max_abs_diff']:.2g}, "
        f"tolerance {tolerance['atol']:g} + {tolerance['rtol']:g} x max|logits|)"
    )


def register_export_commands(app: typer.Typer) -> None:
    app.command("export")(export)
