"""Verbs: train, eval, predict, methods, demo. User errors print one line and a hint (``--debug`` for the trace)."""

from __future__ import annotations

import csv
import json
import logging
import shlex
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from promptvit.cli.backbone_commands import register_backbone_commands
from promptvit.cli.data_commands import register_data_commands
from promptvit.cli.export_commands import register_export_commands
from promptvit.cli.output import USER_ERRORS, console, fail, state
from promptvit.cli.overrides import apply_overrides, parse_extra_args, read_yaml, switch_method
from promptvit.cli.protocol_commands import register_protocol_commands

app = typer.Typer(
    help="Prompt tuning and PEFT for timm vision backbones.", no_args_is_help=True, add_completion=False
)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
RANDOM_BACKBONE_WARNING = (
    "WARNING: no --pretrained or --weights: the backbone is randomly initialised, so these results say "
    "nothing about transfer from pretrained features (recorded as backbone_init: random in metrics.json)"
)


class _ConsoleLog(logging.Handler):
    """promptvit's log records (one line per epoch, resume, warnings) on the console of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        style = "yellow" if record.levelno >= logging.WARNING else None
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        console.print(prefix + record.getMessage(), style=style, highlight=False, markup=False, soft_wrap=True)


def _show_library_log() -> None:
    library = logging.getLogger("promptvit")
    if not any(isinstance(h, _ConsoleLog) for h in library.handlers):
        library.addHandler(_ConsoleLog())
    library.setLevel(logging.INFO)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False) -> None:
    state["debug"] = debug
    warnings.showwarning = _show_warning
    _show_library_log()


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Warnings (suspicious labels, untrained classes...) as one line, like errors, without source lines."""
    console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def _run_config(
    config: Path | None, shortcuts: dict[str, Any], extra: list[str], recipe: str | None = None
) -> Any:
    from promptvit.experiment import RunConfig
    from promptvit.recipes import apply_recipe

    raw = read_yaml(config) if config else {}
    dropped = switch_method(raw, shortcuts.get("method.name"))
    if dropped:
        console.print(
            f"note: --method {shortcuts['method.name']} replaces the config's method; its options "
            f"{', '.join(dropped)} are not carried over",
            highlight=False,
            markup=False,
        )
    raw = apply_overrides(raw, shortcuts)
    raw = apply_overrides(raw, parse_extra_args(extra))
    if recipe:  # beneath the config file and the command line: only what they leave unset
        raw = apply_recipe(raw, recipe)
    return RunConfig.model_validate(raw)


@app.command(context_settings=EXTRA)
def train(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML run config")] = None,
    backbone: Annotated[
        str | None, typer.Option(help="timm name, e.g. vit_base_patch16_224.orig_in21k")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="local backbone weights (.safetensors/.pth)")] = None,
    pretrained: Annotated[bool | None, typer.Option(help="download hub weights for --backbone")] = None,
    method: Annotated[str | None, typer.Option(help="tuning method (see `promptvit methods`)")] = None,
    data: Annotated[str | None, typer.Option(help="image folder, CSV, MedFMC root or .npz")] = None,
    data_kind: Annotated[str | None, typer.Option(help="folder, csv, medfmc, npz or digits")] = None,
    dataset: Annotated[str | None, typer.Option(help="MedFMC dataset: chest, colon or endo")] = None,
    shots: Annotated[int | None, typer.Option(help="K shots per class")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (split and training)")] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs")] = None,
    out: Annotated[str | None, typer.Option(help="output folder for runs")] = None,
    name: Annotated[str | None, typer.Option(help="run folder name")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run folder's last checkpoint")] = True,
    recipe: Annotated[
        str | None, typer.Option(help="a paper's recipe for what you leave unset (see `promptvit recipes`)")
    ] = None,
) -> None:
    """Train one method on one few-shot split. Any option can be overridden as --section.option VALUE,
    e.g. --method.prompt-length 100 --train.lr 0.01."""
    from promptvit.experiment import run_experiment

    shortcuts = {
        "backbone.name": backbone,
        "backbone.weights": str(weights) if weights else None,
        "backbone.pretrained": pretrained,
        "method.name": method,
        "data.path": data,
        "data.kind": data_kind,
        "data.dataset": dataset,
        "data.shots": shots,
        "train.seed": seed,
        "train.epochs": epochs,
        "output_dir": out,
        "name": name,
    }
    run_config = None
    try:
        run_config = _run_config(config, shortcuts, ctx.args, recipe)
        metrics = run_experiment(run_config, resume=resume)
    except USER_ERRORS as error:
        fail(error)
    except KeyboardInterrupt:
        _interrupted(run_config.run_dir() if run_config is not None else None)
    from promptvit.train.distributed import is_writer

    if is_writer():  # under torchrun, rank 0 speaks for the run
        _print_run(run_config.run_dir(), metrics)


def _interrupted(run_dir: Path | None) -> None:
    """Ctrl-C during training: say what was kept and the command that continues from it."""
    command = ["promptvit", *(a for a in sys.argv[1:] if a != "--no-resume")]
    checkpoint = run_dir / "checkpoint" if run_dir is not None else None
    if checkpoint is not None and checkpoint.is_dir():
        kept = f"the last checkpoint (saved after every epoch) is in {checkpoint}"
    else:
        kept = "no epoch had finished, so nothing was saved yet"
    console.print(f"interrupted: {kept}; resume with:\n  {shlex.join(command)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=130)


def _print_run(run_dir: Path, metrics: dict[str, Any]) -> None:
    table = Table(title=f"run {run_dir}")
    table.add_column("split")
    table.add_column("metrics")
    for split in ("val", "test"):
        values = metrics.get(split) or metrics.get(f"{split}_metrics") or {}
        shown = ", ".join(
            f"{k} {v:.2f}" for k, v in values.items() if isinstance(v, float) and k != "loss"
        ) + (f" (n={values['num_samples']})" if "num_samples" in values else "")
        table.add_row(split, shown)
    console.print(table)
    console.print(f"selection: {metrics.get('selection', '')}")
    if metrics.get("backbone_init") == "random":
        console.print(RANDOM_BACKBONE_WARNING, style="bold yellow", highlight=False, markup=False)
    console.print(f"artifact: {run_dir / 'artifact'}  metrics: {run_dir / 'metrics.json'}")


def _local(address: Path) -> Path:
    """A folder, a run folder or ``hf-hub:ORG/NAME[@revision]`` (downloaded, or from the Hub cache) as a folder."""
    from promptvit.hub import local_folder

    return local_folder(str(address))


def _load_for_inference(path: Path) -> tuple[Any, dict[str, Any]]:
    from promptvit.artifact import default_data_config, load, read_artifact_config

    info = read_artifact_config(path)
    model = load(path).eval()
    info.setdefault("data_config", default_data_config(model))
    return model, info


def _inputs(*paths: str | Path | None) -> list[Path]:
    """What a command reads, for ``check_output_path``: its run/artifact folders and data paths."""
    return [Path(p) for p in paths if p is not None and Path(p).exists()]


def _labelled_dataset(
    run_or_artifact: Path, data: str | None, data_kind: str | None, extra: list[str], info: dict[str, Any]
) -> Any:
    """The images to evaluate or analyse: ``--data`` (all of it), else the run's own test split."""
    from promptvit.data import ImageDataset, build_transforms
    from promptvit.experiment import DataSpec, load_samples, make_split

    if data is None and data_kind != "digits":
        run_config = run_or_artifact / "config.yaml"
        if not run_config.is_file():
            raise typer.BadParameter(
                "give --data (an artifact folder has no run config to take a test split from)"
            )
        from promptvit.data.manifest import SPLIT_FILES, recorded_samples

        if (run_or_artifact / SPLIT_FILES).is_file():
            samples = recorded_samples(run_or_artifact / SPLIT_FILES, "test")
        else:  # a run from before split files were recorded: the split is drawn again
            raw = read_yaml(run_config)
            samples = make_split(DataSpec.model_validate(raw["data"]), raw["train"]["seed"]).test
    else:
        raw = apply_overrides({"path": data, "kind": data_kind or "folder"}, parse_extra_args(extra))
        samples = load_samples(DataSpec.model_validate(raw))
    if samples.class_names != info["class_names"]:
        raise ValueError(
            f"the data's classes {samples.class_names} differ from the artifact's {info['class_names']}; "
            "evaluate on data with the artifact's classes (an artifact saved from Python names them with "
            "save_pretrained(folder, class_names=[...]))"
        )
    return ImageDataset(samples, build_transforms(info["data_config"], train=False))


@app.command("eval", context_settings=EXTRA)
def eval_(
    ctx: typer.Context,
    run_or_artifact: Annotated[Path, typer.Argument(help="run folder, artifact folder or hf-hub:ORG/NAME")],
    data: Annotated[
        str | None, typer.Option(help="dataset to evaluate on (default: the run's test split)")
    ] = None,
    data_kind: Annotated[str | None, typer.Option(help="folder, csv, medfmc, npz or digits")] = None,
    out: Annotated[Path | None, typer.Option(help="write the metrics as JSON here")] = None,
    uncalibrated: Annotated[
        bool, typer.Option("--uncalibrated", help="score the raw probabilities, not the stored calibration")
    ] = False,
    bins: Annotated[int, typer.Option(min=1, max=1000, help="bins of ECE, equal-mass ECE and MCE")] = 15,
) -> None:
    """Evaluate a trained artifact on a labelled dataset (every image in it) or on its run's test split
    (exactly the files the run recorded; changed or vanished files are reported)."""
    from promptvit.artifact import resolve_artifact_dir
    from promptvit.io import atomic_write_text, check_output_path
    from promptvit.train.clinical import evaluate_artifact

    try:
        run_or_artifact = _local(run_or_artifact)
        if out:
            check_output_path(out, protected=_inputs(run_or_artifact, data))
        model, info = _load_for_inference(run_or_artifact)
        dataset = _labelled_dataset(run_or_artifact, data, data_kind, ctx.args, info)
        metrics = evaluate_artifact(
            model,
            dataset,
            info,
            resolve_artifact_dir(run_or_artifact),
            calibrated=not uncalibrated,
            bins=bins,
        )
        if out:
            atomic_write_text(out, json.dumps(metrics, indent=2) + "\n")
    except (*USER_ERRORS, ValueError) as error:
        fail(error)
    console.print_json(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}))


@app.command()
def predict(
    artifact: Annotated[Path, typer.Argument(help="artifact folder, run folder or hf-hub:ORG/NAME")],
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    out: Annotated[Path, typer.Option(help="CSV of per-class probabilities")] = Path("predictions.csv"),
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 32,
    uncalibrated: Annotated[
        bool, typer.Option("--uncalibrated", help="raw probabilities, not the stored calibration/thresholds")
    ] = False,
) -> None:
    """Write per-class probabilities for each image to a CSV: softmax (or sigmoid for multi-label) of the
    logits calibrated as stored in the artifact, and the decision at its stored thresholds."""
    from promptvit.artifact import resolve_artifact_dir
    from promptvit.data import IMAGE_EXTENSIONS, ImageDataset, build_transforms
    from promptvit.data.sources import LabeledSamples, Sample
    from promptvit.io import atomic_write, check_output_path
    from promptvit.train import predict_logits
    from promptvit.train.clinical import artifact_probabilities, predicted_labels

    try:
        artifact = _local(artifact)
        check_output_path(out, protected=_inputs(artifact, *images))
        model, info = _load_for_inference(artifact)
        files = []
        for path in images:
            if path.is_dir():
                files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            elif path.is_file():
                files.append(path)
            else:
                raise FileNotFoundError(f"image not found: {path}")
        if not files:
            raise FileNotFoundError(f"no images found in {', '.join(map(str, images))}")
        names = info["class_names"]
        dummy = tuple([0] * len(names)) if info["multilabel"] else 0
        samples = LabeledSamples([Sample(str(f), dummy) for f in files], names, info["multilabel"], "predict")
        dataset = ImageDataset(samples, build_transforms(info["data_config"], train=False))
        logits, _ = predict_logits(model, dataset, batch_size=batch_size)
        scores = artifact_probabilities(
            logits, info, resolve_artifact_dir(artifact), calibrated=not uncalibrated
        )
        labels = predicted_labels(scores, info, calibrated=not uncalibrated)
        rows = [
            [s.path, *map(float, row), label]
            for s, row, label in zip(samples.items, scores.tolist(), labels, strict=True)
        ]
    except (*USER_ERRORS, FileNotFoundError) as error:
        fail(error)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", *names, "prediction"])
            for row in rows:
                writer.writerow([row[0], *(f"{p:.6f}" for p in row[1:-1]), row[-1]])

    try:
        atomic_write(out, write)
    except USER_ERRORS as error:
        fail(error)
    console.print(f"wrote {len(rows)} predictions to {escape(str(out))}", highlight=False)


@app.command(context_settings=EXTRA)
def analyze(
    ctx: typer.Context,
    run_or_artifact: Annotated[Path, typer.Argument(help="run folder, artifact folder or hf-hub:ORG/NAME")],
    out: Annotated[Path, typer.Option(help="folder for the figures and analysis.json")],
    data: Annotated[
        str | None, typer.Option(help="dataset to analyse (default: the run's test split)")
    ] = None,
    data_kind: Annotated[str | None, typer.Option(help="folder, csv, medfmc, npz or digits")] = None,
    compare: Annotated[
        list[Path] | None, typer.Option(help="other runs/artifacts to compare (repeatable)")
    ] = None,
    max_samples: Annotated[int, typer.Option(help="images drawn (seeded) from the dataset")] = 500,
    seed: Annotated[int, typer.Option(help="seed of the subsample and t-SNE")] = 0,
    bins: Annotated[int, typer.Option(min=1, max=1000, help="bins of the reliability diagram")] = 15,
) -> None:
    """Why it works: calibration, prompt/patch NMI, CKA, attention distance and maps, as PNGs + analysis.json."""
    from promptvit.analysis import analyze as run_analysis
    from promptvit.evaluation.calibration import artifact_calibration
    from promptvit.io import check_output_path

    name = run_or_artifact.name
    try:
        run_or_artifact = _local(run_or_artifact)
        compare = [_local(path) for path in compare or []]
        check_output_path(out / "analysis.json", protected=_inputs(run_or_artifact, data, *compare))
        model, info = _load_for_inference(run_or_artifact)
        dataset = _labelled_dataset(run_or_artifact, data, data_kind, ctx.args, info)
        loaded = {path.name: (path, _load_for_inference(path)) for path in compare}
        others = {name: model_info[0] for name, (_, model_info) in loaded.items()}
        calibrations = {name: artifact_calibration(info, run_or_artifact)}
        calibrations.update(
            {name: artifact_calibration(model_info[1], path) for name, (path, model_info) in loaded.items()}
        )
        result = run_analysis(
            model,
            dataset,
            out_dir=out,
            class_names=info["class_names"],
            max_samples=max_samples,
            seed=seed,
            compare=others or None,
            name=name,
            calibrations=calibrations,
            reliability_bins=bins,
        )
    except (*USER_ERRORS, ValueError) as error:
        fail(error)
    figures = sorted(p.name for p in out.glob("*.png"))
    sample = result["sample"]
    console.print(
        f"analysed {sample['n']} of {sample['dataset_size']} images (seed {seed}); wrote {', '.join(figures)}"
    )
    console.print(f"every number drawn: {out / 'analysis.json'}")


@app.command("bench-methods", context_settings=EXTRA)
def bench_methods(
    ctx: typer.Context,
    backbone: Annotated[str, typer.Option(help="timm name")] = "vit_tiny_patch16_224",
    methods: Annotated[
        str, typer.Option(help="comma-separated methods")
    ] = "linear,bias,lora,adapter,vpt,ept,full",
    image_size: Annotated[int, typer.Option(help="input size (the backbone is built for it)")] = 112,
    batch_size: Annotated[int, typer.Option(help="images per step")] = 32,
    num_classes: Annotated[int, typer.Option(help="head size")] = 10,
    steps: Annotated[int, typer.Option(help="timed steps per repeat")] = 5,
    repeats: Annotated[int, typer.Option(help="repeats (min/median/max are reported)")] = 3,
    out: Annotated[Path, typer.Option(help="folder for the table, figure and JSON")] = Path("efficiency"),
) -> None:
    """Efficiency portrait (AP Table 2): tuned parameters, peak memory, time per epoch, throughput, side by side.
    Backbone build options as --backbone.OPTION VALUE (e.g. --backbone.depth 6)."""
    import functools

    import torch

    from promptvit.analysis import efficiency_portrait, efficiency_table, plot_efficiency
    from promptvit.backbones import create_backbone
    from promptvit.io import atomic_write_text, check_output_path
    from promptvit.methods import get_method

    options = {k.removeprefix("backbone."): v for k, v in parse_extra_args(ctx.args).items()}
    options.setdefault("img_size", image_size)
    factory = functools.partial(create_backbone, backbone, **options)
    try:
        check_output_path(out / "efficiency.md")  # before minutes of measuring
        for name in methods.split(","):
            get_method(name)  # ConfigError listing the methods, before any measuring
        rows = efficiency_portrait(
            factory,
            [(name, {}) for name in methods.split(",")],
            num_classes=num_classes,
            batch_size=batch_size,
            image_size=image_size,
            steps=steps,
            repeats=repeats,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
        table = efficiency_table(rows)
        atomic_write_text(out / "efficiency.md", table + "\n")
        atomic_write_text(out / "efficiency.json", json.dumps(rows, indent=2, default=str) + "\n")
        plot_efficiency(rows, out / "efficiency.png")
    except USER_ERRORS as error:
        fail(error)
    console.print(table)
    console.print(f"wrote {out}/efficiency.md, efficiency.json and efficiency.png")


@app.command()
def recipes(
    name: Annotated[str | None, typer.Argument(help="show one recipe's values and their sources")] = None,
) -> None:
    """List the papers' recipes (`--recipe NAME` on train), or one recipe's values with their sources."""
    from promptvit.recipes import RECIPES, describe, get_recipe

    if name is None:
        table = Table(title="promptvit recipes")
        for column in ("recipe", "paper", "summary"):
            table.add_column(column, overflow="fold")
        for recipe in RECIPES.values():
            table.add_row(recipe.label, recipe.paper, recipe.description)
        console.print(table)
        return
    try:
        recipe = get_recipe(name)
    except USER_ERRORS as error:
        fail(error)
    table = Table(title=f"{recipe.label}: {recipe.paper}")
    for column in ("key", "value", "source"):
        table.add_column(column, overflow="fold")
    for row in describe(recipe):
        table.add_row(*row)
    console.print(table)
    for note in recipe.notes:
        console.print(f"note: {note}")


@app.command()
def methods() -> None:
    """List every registered method with its options, defaults and source paper."""
    from promptvit.cli.catalog import method_rows, render

    console.print(render(method_rows(), console.width), highlight=False, markup=False, soft_wrap=True)


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="output folder")] = "runs/demo",
    methods: Annotated[str, typer.Option(help="comma-separated methods")] = "linear,bias,lora,vpt,ept",
    epochs: Annotated[int | None, typer.Option(help="epochs per method (default: the demo config's)")] = None,
    shots: Annotated[int | None, typer.Option(help="training images per class (default 10)")] = None,
) -> None:
    """Offline end-to-end job: pretrain a small ViT on digits 0-4, adapt it few-shot to 5-9 with each method."""
    from promptvit.demo import run_demo

    console.print(f"stage 1: pretraining a small ViT on digits 0-4 (cached in {out}/pretrained) ...")
    try:
        results = run_demo(
            out,
            methods.split(","),
            epochs=epochs,
            shots=shots,
            on_done=lambda method, m: console.print(f"stage 2: {method} done ({m['seconds_total']:.0f} s)"),
        )
    except USER_ERRORS as error:
        fail(error)
    table = Table(title="few-shot digits 5-9 on a backbone pretrained on digits 0-4 (test split, %)")
    for column in ("method", "tuned params", "val acc", "test acc", "test bal. acc", "best epoch", "seconds"):
        table.add_column(column)
    for m in results:
        table.add_row(
            m["method"],
            f"{m['parameters']['tuned']:,}",
            f"{m['val']['accuracy']:.1f}",
            f"{m['test']['accuracy']:.1f}",
            f"{m['test']['balanced_accuracy']:.1f}",
            str(m["best_epoch"]),
            f"{m['seconds_total']:.0f}",
        )
    console.print(table)
    console.print(f"artifacts and metrics: {out}/<method>/ (artifact/, metrics.json, log.csv)")


# Verbs that live in their own modules (each imports its heavy dependencies when it runs).
for register in (
    register_protocol_commands,
    register_data_commands,
    register_export_commands,
    register_backbone_commands,
):
    register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume from the last checkpoint")
        sys.exit(130)
