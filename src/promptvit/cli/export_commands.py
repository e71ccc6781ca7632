"""Verbs ``export`` (a peft adapter, a plain timm checkpoint or ONNX) and ``push`` (to the Hugging Face Hub).

Registered on the main app by ``register_export_commands(app)``; user errors print one line (``cli.output.fail``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape


def export(
    artifact: Annotated[Path, typer.Argument(help="artifact folder, run folder or hf-hub:ORG/NAME")],
    format: Annotated[str, typer.Option("--format", "-f", help="peft, onnx or merged-timm")],
    out: Annotated[Path, typer.Option(help="new (or empty) folder for the exported files")],
) -> None:
    """Export a trained artifact for other tools; the export is loaded back and its logits checked."""
    from promptvit.cli.output import USER_ERRORS, console, fail
    from promptvit.export import ExportError, export

    try:
        # loading the backbone, tracing (ONNX) and the check run a while: a spinner on a terminal
        with console.status(f"exporting to {escape(format)}: loading the model, writing, checking the logits ..."):
            record = export(artifact, out, format)
    except (*USER_ERRORS, ExportError) as error:
        fail(error)
    tolerance = record["tolerance"]
    console.print(
        f"wrote {format} export of '{record['method']}' to {out}: {', '.join(record['files'])}; "
        f"logits match the tuned model (max abs diff {record['max_abs_diff']:.2g}, "
        f"tolerance {tolerance['atol']:g} + {tolerance['rtol']:g} x max|logits|)",
        markup=False,
        highlight=False,
    )


def push(
    run_or_artifact: Annotated[
        Path, typer.Argument(help="run folder (artifact + metrics + recipe) or artifact")
    ],
    repo: Annotated[str, typer.Option(help="Hub repository, ORG/NAME")],
    private: Annotated[bool, typer.Option(help="create the repository as private")] = False,
    license: Annotated[
        str | None, typer.Option(help="licence of the model (a Hub licence id); default: unknown")
    ] = None,
) -> None:
    """Upload an artifact with a model card to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`);
    a method peft can express (LoRA) also goes in as a peft adapter in peft/."""
    from promptvit.cli.output import USER_ERRORS, console, fail
    from promptvit.hub import push_to_hub, repo_id_of

    try:
        repo_id = repo_id_of(repo)
        url = push_to_hub(
            run_or_artifact,
            repo_id,
            private=private,
            license=license,
            peft_model=_peft_model(run_or_artifact),
        )
    except (*USER_ERRORS, OSError) as error:
        fail(error)
    console.print(
        f'pushed to {url}; load with promptvit.load("hf-hub:{repo_id}")', highlight=False, markup=False
    )


def _peft_model(run_or_artifact: Path) -> object:
    """The tuned model where its method has a peft form (its repository then holds peft/ too), else None."""
    from promptvit.artifact import load, read_artifact_config
    from promptvit.methods import get_method

    if not get_method(read_artifact_config(run_or_artifact)["method"]).has_peft_form():
        return None
    return load(run_or_artifact)


def register_export_commands(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("push")(push)
