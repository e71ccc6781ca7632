"""Verbs: train, eval, predict, methods, demo. User errors print one line and a hint (``--debug`` for the trace)."""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from promptvit.cli.backbone_commands import register_backbone_commands
from promptvit.cli.data_commands import register_data_commands
from promptvit.cli.export_commands import register_export_commands
from promptvit.cli.output import (
    DATA_KIND_HELP,
    USER_ERRORS,
    console,
    csv_options,
    fail,
    file_column_option,
    guard_output,
    image_root_option,
    label_column_option,
    state,
)
from promptvit.cli.overrides import apply_overrides, parse_extra_args, read_yaml, switch_method
from promptvit.cli.protocol_commands import register_protocol_commands
from promptvit.validation import MAX_SEED

app = typer.Typer(
    help="Prompt tuning and PEFT for timm vision backbones.", no_args_is_help=True, add_completion=False
)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
EFFICIENCY_FILES = ("efficiency.md", "efficiency.json", "efficiency.png")
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
    from promptvit.recipes import apply_recipe
    from promptvit.run_config import RunConfig

    raw = read_yaml(config) if config else {}
    dropped = switch_method(raw, shortcuts.get("method.name"))
    if dropped:
        console.print(
            f"note: --method {shortcuts['method.name']} replaces the config's method; its options "
            f"{', '.join(dropped)} are not carried over",
            highlight=False,
            markup=False,
        )
    overrides = {**shortcuts, **parse_extra_args(extra)}
    planned = copy.deepcopy(raw)  # what the config (and recipe) would train, for the warm-up below
    raw = apply_overrides(raw, overrides)
    if recipe:  # beneath the config file and the command line: only what they leave unset
        raw = apply_recipe(raw, recipe)
        planned = apply_recipe(planned, recipe)
    if overrides.get("train.epochs") is not None and overrides.get("train.warmup_epochs") is None:
        _shorten_warmup(raw, planned)
    return RunConfig.model_validate(raw)


def _shorten_warmup(raw: dict[str, Any], planned: dict[str, Any]) -> None:
    """``--epochs`` shorter than the config's warm-up: scale the warm-up by the same factor, and say so."""
    from promptvit.train import TrainConfig

    train, before = raw.get("train") or {}, planned.get("train") or {}
    defaults = TrainConfig.model_fields
    warmup = train.get("warmup_epochs", defaults["warmup_epochs"].default)
    epochs, was = train.get("epochs"), before.get("epochs", defaults["epochs"].default)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (warmup, epochs, was))
    if not numbers or warmup <= epochs or was <= 0:
        return
    scaled = round(warmup * epochs / was, 3)
    train["warmup_epochs"] = scaled
    console.print(
        f"note: --epochs {epochs} is shorter than the config's warm-up of {warmup} epochs (of {was}); the "
        f"warm-up is scaled by the same factor to {scaled:g} epochs (set --train.warmup-epochs to choose)",
        highlight=False,
        markup=False,
    )


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
    data: Annotated[
        str | None,
        typer.Option(help="image folder, CSV, .npz, a `data fewshot` folder or K-shot split, MedFMC root"),
    ] = None,
    data_kind: Annotated[str | None, typer.Option(help=DATA_KIND_HELP)] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="MedFMC data set (chest, colon, endo...) or a `data fewshot --format medfmc` name"),
    ] = None,
    image_root: Annotated[str | None, image_root_option()] = None,
    file_column: Annotated[str | None, file_column_option()] = None,
    label_column: Annotated[str | None, label_column_option()] = None,
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
    from promptvit.run_config import resolved_data

    shortcuts = {
        "backbone.name": backbone,
        "backbone.weights": str(weights) if weights else None,
        "backbone.pretrained": pretrained,
        "method.name": method,
        "data.path": data,
        "data.kind": data_kind,
        "data.dataset": dataset,
        "data.image_root": image_root,
        "data.file_column": file_column,
        "data.label_column": label_column,
        "data.shots": shots,
        "train.seed": seed,
        "train.epochs": epochs,
        "output_dir": out,
        "name": name,
    }
    from promptvit.train.distributed import is_writer, launched

    run_config = ranks = None
    previous = signal.getsignal(signal.SIGTERM)
    try:
        ranks = launched()  # a broken torchrun environment is refused before anything is read
        if ranks is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)  # torchrun ends the others this way when one fails
        run_config = resolved_data(_run_config(config, shortcuts, ctx.args, recipe))
        metrics = run_experiment(run_config, resume=resume)
    except USER_ERRORS as error:
        fail(error)
    except KeyboardInterrupt as stop:
        run_dir = run_config.run_dir() if run_config is not None else None
        if isinstance(stop, _Terminated):
            _interrupted(run_dir, ranks, "stopped by SIGTERM (torchrun stops every process when one fails)", 143)
        _interrupted(run_dir, ranks)
    except RuntimeError as error:
        if ranks is None or not _lost_peer(error):
            raise
        # gloo's text: "[.../pair.cc:545] Read error [host]:port: Connection reset by peer. This is typically..."
        detail = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip()).split(". ")[0] or type(error).__name__
        run_dir = run_config.run_dir() if run_config is not None else None
        _interrupted(run_dir, ranks, f"stopped: another process of the run failed ({detail})", 1)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    if is_writer():  # under torchrun, rank 0 speaks for the run
        _print_run(run_config.run_dir(), metrics)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so the run ends the way Ctrl-C ends it."""


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise _Terminated


def _lost_peer(error: RuntimeError) -> bool:
    """Whether ``error`` is torch.distributed's report of a process that went away (gloo, NCCL, the store)."""
    import torch.distributed as dist

    return isinstance(error, getattr(dist, "DistError", ())) or any(
        words in str(error) for words in ("Connection closed by peer", "Connection reset by peer")
    )


def _interrupted(run_dir: Path | None, ranks: Any = None, why: str = "interrupted", code: int = 130) -> None:
    """Ctrl-C (or one torchrun process dying): say what was kept and the command that continues from it."""
    args = [a for a in sys.argv[1:] if a != "--no-resume"]
    if ranks is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this message short
    if ranks is None:
        command = shlex.join(["promptvit", *args])
    else:  # every process gets the same command again; torchrun's own options as they were
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(ranks.world_size))
        command = shlex.join(["torchrun", f"--nproc_per_node={per_node}", "-m", "promptvit", *args])
        if int(per_node) != ranks.world_size:
            command += "  (on every node, with the same torchrun options as before)"
        why = f"rank {ranks.rank}: {why}"
    checkpoint = run_dir / "checkpoint" if run_dir is not None else None
    if checkpoint is not None and checkpoint.is_dir():
        kept = f"the last checkpoint (saved after every epoch) is in {checkpoint}"
    else:
        kept = "no epoch had finished, so nothing was saved yet"
    console.print(f"{why}: {kept}; resume with:\n  {command}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code=code)


def _print_run(run_dir: Path, metrics: dict[str, Any]) -> None:
    from promptvit.cli.clinical_tables import print_clinical

    val = metrics.get("val") or {}
    shown = ", ".join(
        f"{k} {v:.2f}"
        for k, v in val.items()
        if k in ("accuracy", "balanced_accuracy", "auc", "map") and isinstance(v, float)
    )
    console.print(escape(f"run {run_dir}"), style="bold", highlight=False)
    console.print(escape(f"val (n = {val.get('num_samples', '?')}): {shown or '—'}"), highlight=False)
    console.print(escape(f"selection: {metrics.get('selection', '')}"), highlight=False)
    if metrics.get("test"):
        print_clinical(metrics["test"], "test")
    if metrics.get("backbone_init") == "random":
        console.print(RANDOM_BACKBONE_WARNING, style="bold yellow", highlight=False, markup=False)
    console.print(
        escape(f"artifact: {run_dir / 'artifact'}  metrics: {run_dir / 'metrics.json'}"), highlight=False
    )


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
    run_or_artifact: Path,
    data: str | None,
    data_kind: str | None,
    extra: list[str],
    info: dict[str, Any],
    csv: dict[str, str] | None = None,
) -> tuple[Any, Any, Any]:
    """The images to evaluate or analyse: ``--data`` (its test split, or all of it when it has none), else
    the run's own test split; with the data's spec (None where unknown) and the run config (or None)."""
    from promptvit.data import ImageDataset, build_transforms
    from promptvit.data.spec import DataSpec, evaluation_samples, make_split, resolve_data_spec
    from promptvit.run_config import RunConfig

    run_config = None
    if (run_or_artifact / "config.yaml").is_file():
        try:
            run_config = RunConfig.model_validate(read_yaml(run_or_artifact / "config.yaml"))
        except USER_ERRORS:  # an old or edited config: scoring does not need it
            run_config = None
    if data is None and data_kind != "digits":
        if not (run_or_artifact / "config.yaml").is_file():
            raise typer.BadParameter(
                "give --data (an artifact folder has no run config to take a test split from)"
            )
        from promptvit.data.manifest import SPLIT_FILES, recorded_samples

        spec = run_config.data if run_config is not None else None
        if (run_or_artifact / SPLIT_FILES).is_file():
            samples = recorded_samples(run_or_artifact / SPLIT_FILES, "test")
        else:  # a run from before split files were recorded: the split is drawn again
            raw = read_yaml(run_or_artifact / "config.yaml")
            samples = make_split(DataSpec.model_validate(raw["data"]), raw["train"]["seed"]).test
    else:
        given = {"path": data, "kind": data_kind or "auto", **(csv or {})}
        raw = apply_overrides(given, {k.removeprefix("data."): v for k, v in parse_extra_args(extra).items()})
        spec = resolve_data_spec(DataSpec.model_validate(raw))
        samples = evaluation_samples(spec)
    if samples.class_names != info["class_names"]:
        raise ValueError(
            f"the data's classes {samples.class_names} differ from the artifact's {info['class_names']}; "
            "evaluate on data with the artifact's classes (an artifact saved from Python names them with "
            "save_pretrained(folder, class_names=[...]))"
        )
    dataset = ImageDataset(samples, build_transforms(info["data_config"], train=False))
    return dataset, spec, run_config


@app.command("eval", context_settings=EXTRA)
def eval_(
    ctx: typer.Context,
    run_or_artifact: Annotated[Path, typer.Argument(help="run folder, artifact folder or hf-hub:ORG/NAME")],
    data: Annotated[
        str | None,
        typer.Option(
            help="data to evaluate on: its test split, or every image (default: the run's test split)"
        ),
    ] = None,
    data_kind: Annotated[str | None, typer.Option(help=DATA_KIND_HELP)] = None,
    image_root: Annotated[str | None, image_root_option()] = None,
    file_column: Annotated[str | None, file_column_option()] = None,
    label_column: Annotated[str | None, label_column_option()] = None,
    out: Annotated[Path | None, typer.Option(help="write the metrics as JSON here")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print every metric as JSON instead of tables")
    ] = False,
    uncalibrated: Annotated[
        bool, typer.Option("--uncalibrated", help="score the raw probabilities, not the stored calibration")
    ] = False,
    bins: Annotated[int, typer.Option(min=1, max=1000, help="bins of ECE, equal-mass ECE and MCE")] = 15,
) -> None:
    """Evaluate a trained artifact on its run's test split (exactly the files the run recorded; changed or
    vanished files are reported) or on --data. Prints the main metric and AUC with bootstrap CIs,
    sensitivity/specificity/PPV/NPV at the stored threshold, and the probabilities raw -> calibrated."""
    from promptvit.artifact import resolve_artifact_dir
    from promptvit.cli.clinical_tables import print_clinical
    from promptvit.data.spec import sample_groups
    from promptvit.io import atomic_write_text, output_file
    from promptvit.train.clinical import evaluate_artifact

    try:
        run_or_artifact = _local(run_or_artifact)
        if out:
            output_file(out, inputs=_inputs(run_or_artifact, data))
        model, info = _load_for_inference(run_or_artifact)
        csv_given = csv_options(image_root, file_column, label_column)
        dataset, spec, run_config = _labelled_dataset(
            run_or_artifact, data, data_kind, ctx.args, info, csv_given
        )
        groups, group_rule = sample_groups(dataset.samples, spec)
        main_metric = None
        if run_config is not None:
            main_metric = run_config.train.select_metric
            if main_metric == "loss":
                main_metric = None
        metrics = evaluate_artifact(
            model,
            dataset,
            info,
            resolve_artifact_dir(run_or_artifact),
            calibrated=not uncalibrated,
            bins=bins,
            main_metric=main_metric,
            groups=groups,
            group_rule=group_rule,
            options=run_config.evaluation if run_config is not None else None,
            progress=not as_json,
        )
        if out:
            atomic_write_text(out, json.dumps(metrics, indent=2) + "\n")
    except (*USER_ERRORS, ValueError) as error:
        fail(error)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    scored = "its recorded test split" if data is None else f"{data} ({spec.kind if spec else 'data'})"
    print_clinical(metrics, f"{run_or_artifact} on {scored}")


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
    from promptvit.io import atomic_write, output_file
    from promptvit.train import predict_logits
    from promptvit.train.clinical import artifact_probabilities, predicted_labels

    try:
        artifact = _local(artifact)
        output_file(out, inputs=_inputs(artifact, *images))
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
    console.print(f"wrote {len(rows)} predictions to {out}", highlight=False, markup=False)


@app.command(context_settings=EXTRA)
def analyze(
    ctx: typer.Context,
    run_or_artifact: Annotated[Path, typer.Argument(help="run folder, artifact folder or hf-hub:ORG/NAME")],
    out: Annotated[Path, typer.Option(help="folder for the figures and analysis.json")],
    data: Annotated[
        str | None,
        typer.Option(help="data to analyse: its test split, or every image (default: the run's test split)"),
    ] = None,
    data_kind: Annotated[str | None, typer.Option(help=DATA_KIND_HELP)] = None,
    image_root: Annotated[str | None, image_root_option()] = None,
    file_column: Annotated[str | None, file_column_option()] = None,
    label_column: Annotated[str | None, label_column_option()] = None,
    compare: Annotated[
        list[Path] | None, typer.Option(help="other runs/artifacts to compare (repeatable)")
    ] = None,
    max_samples: Annotated[int, typer.Option(min=1, help="images drawn (seeded) from the dataset")] = 500,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="seed of the subsample and t-SNE")] = 0,
    bins: Annotated[int, typer.Option(min=1, max=1000, help="bins of the reliability diagram")] = 15,
) -> None:
    """Why it works: calibration, prompt/patch NMI, CKA, attention distance and maps, as PNGs + analysis.json."""
    from promptvit.analysis import analyze as run_analysis
    from promptvit.analysis.report import ANALYSIS_FILES
    from promptvit.evaluation.calibration import artifact_calibration
    from promptvit.io import output_folder

    name = run_or_artifact.name
    try:
        run_or_artifact = _local(run_or_artifact)
        compare = [_local(path) for path in compare or []]
        inputs = _inputs(run_or_artifact, data, *compare)
        output_folder(out, "analysis", inputs=inputs, legacy=ANALYSIS_FILES, create=False)  # before any work
        model, info = _load_for_inference(run_or_artifact)
        csv_given = csv_options(image_root, file_column, label_column)
        dataset, _, _ = _labelled_dataset(run_or_artifact, data, data_kind, ctx.args, info, csv_given)
        loaded = {path.name: (path, _load_for_inference(path)) for path in compare}
        others = {name: model_info[0] for name, (_, model_info) in loaded.items()}
        console.print(
            escape(
                f"analysing {min(max_samples, len(dataset))} of {len(dataset)} images (seed {seed}) with "
                f"{1 + len(loaded)} model(s); t-SNE and attention maps take a while"
            ),
            highlight=False,
        )
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
            progress=True,
        )
    except (*USER_ERRORS, ValueError) as error:
        fail(error)
    figures = sorted(p.name for p in out.glob("*.png"))
    sample = result["sample"]
    console.print(
        f"analysed {sample['n']} of {sample['dataset_size']} images (seed {seed}); wrote {', '.join(figures)}",
        markup=False,
    )
    console.print(f"every number drawn: {out / 'analysis.json'}", highlight=False, markup=False)


@app.command("bench-methods", context_settings=EXTRA)
def bench_methods(
    ctx: typer.Context,
    backbone: Annotated[str, typer.Option(help="timm name")] = "vit_tiny_patch16_224",
    methods: Annotated[
        str, typer.Option(help="comma-separated methods")
    ] = "linear,bias,lora,adapter,vpt,ept,full",
    image_size: Annotated[int, typer.Option(min=8, help="input size (the backbone is built for it)")] = 112,
    batch_size: Annotated[int, typer.Option(min=1, help="images per step")] = 32,
    num_classes: Annotated[int, typer.Option(min=1, help="head size")] = 10,
    steps: Annotated[int, typer.Option(min=1, help="timed steps per repeat")] = 5,
    repeats: Annotated[int, typer.Option(min=1, help="repeats (min/median/max are reported)")] = 3,
    out: Annotated[Path, typer.Option(help="folder for the table, figure and JSON")] = Path("efficiency"),
) -> None:
    """Efficiency portrait (AP Table 2): tuned parameters, peak memory, time per epoch, throughput, side by side.
    Backbone build options as --backbone.OPTION VALUE (e.g. --backbone.depth 6)."""
    import functools

    import torch

    from promptvit.analysis import efficiency_portrait, efficiency_table, plot_efficiency
    from promptvit.backbones import create_backbone
    from promptvit.io import atomic_write_text, output_folder
    from promptvit.methods import get_method

    options = {k.removeprefix("backbone."): v for k, v in parse_extra_args(ctx.args).items()}
    options.setdefault("img_size", image_size)
    factory = functools.partial(create_backbone, backbone, **options)
    try:
        output_folder(out, "efficiency", legacy=EFFICIENCY_FILES, create=False)  # before minutes of measuring
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
        output_folder(out, "efficiency", legacy=EFFICIENCY_FILES)
        atomic_write_text(out / "efficiency.md", table + "\n")
        atomic_write_text(out / "efficiency.json", json.dumps(rows, indent=2, default=str) + "\n")
        plot_efficiency(rows, out / "efficiency.png")
    except USER_ERRORS as error:
        fail(error)
    console.print(table)
    console.print(f"wrote {out}/efficiency.md, efficiency.json and efficiency.png", markup=False)


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
    epochs: Annotated[int | None, typer.Option(min=1, help="epochs per method (default: the demo config's)")] = None,
    shots: Annotated[int | None, typer.Option(min=1, help="training images per class (default 10)")] = None,
) -> None:
    """Offline end-to-end job: pretrain a small ViT on digits 0-4, adapt it few-shot to 5-9 with each method."""
    from promptvit.demo import run_demo

    console.print(f"stage 1: pretraining a small ViT on digits 0-4 (cached in {out}/pretrained) ...", markup=False)
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
    console.print(f"artifacts and metrics: {out}/<method>/ (artifact/, metrics.json, log.csv)", markup=False)


# Verbs that live in their own modules (each imports its heavy dependencies when it runs).
for register in (
    register_protocol_commands,
    register_data_commands,
    register_export_commands,
    register_backbone_commands,
):
    register(app)


def main() -> None:
    guard_output()  # `promptvit ... | head`: a reader that leaves early ends promptvit quietly
    try:
        try:
            app()
        finally:  # what is still buffered fails here, inside the guard, not at exit
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume from the last checkpoint")
        sys.exit(130)
