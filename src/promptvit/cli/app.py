"""Verbs: train, eval, predict, methods, demo. User errors print one line and a hint (``--debug`` for the trace)."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from promptvit.cli.overrides import apply_overrides, parse_extra_args, read_yaml

app = typer.Typer(
    help="Prompt tuning and PEFT for timm vision backbones.", no_args_is_help=True, add_completion=False
)
console = Console(stderr=False)
_state = {"debug": False}

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _user_errors() -> tuple[type[BaseException], ...]:
    from promptvit.artifact import ArtifactError
    from promptvit.backbones import BackboneError
    from promptvit.data import DataError
    from promptvit.io import OutputError
    from promptvit.methods.base import ConfigError
    from promptvit.train import TrainingError

    return (ArtifactError, BackboneError, DataError, ConfigError, OutputError, TrainingError, ValidationError)


def _fail(error: BaseException) -> None:
    if _state["debug"]:
        raise error
    if isinstance(error, ValidationError):
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
        message = "invalid config: " + "; ".join(lines)
    else:
        message = str(error)
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # paths stay copyable
    console.print(
        "hint: fix the file or option named above; rerun with --debug for the full trace", style="dim"
    )
    raise typer.Exit(code=2)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False) -> None:
    _state["debug"] = debug


def _run_config(config: Path | None, shortcuts: dict[str, Any], extra: list[str]) -> Any:
    from promptvit.experiment import RunConfig

    raw = read_yaml(config) if config else {}
    raw = apply_overrides(raw, shortcuts)
    raw = apply_overrides(raw, parse_extra_args(extra))
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
    try:
        run_config = _run_config(config, shortcuts, ctx.args)
        metrics = run_experiment(run_config, resume=resume)
    except _user_errors() as error:
        _fail(error)
    _print_run(run_config.run_dir(), metrics)


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
    console.print(f"artifact: {run_dir / 'artifact'}  metrics: {run_dir / 'metrics.json'}")


def _artifact_dir(path: Path) -> Path:
    from promptvit.artifact import CONFIG_FILE, ArtifactError

    for candidate in (path, path / "artifact"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise ArtifactError(f"{path} is neither an artifact folder nor a run folder with artifact/ inside")


def _load_for_inference(path: Path) -> tuple[Any, dict[str, Any]]:
    from promptvit.artifact import load, read_artifact_config

    artifact = _artifact_dir(path)
    return load(artifact).eval(), read_artifact_config(artifact)


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
        raw = read_yaml(run_config)
        samples = make_split(DataSpec.model_validate(raw["data"]), raw["train"]["seed"]).test
    else:
        raw = apply_overrides({"path": data, "kind": data_kind or "folder"}, parse_extra_args(extra))
        samples = load_samples(DataSpec.model_validate(raw))
    if samples.class_names != info["class_names"]:
        raise ValueError(
            f"the data's classes {samples.class_names} differ from the artifact's {info['class_names']}"
        )
    return ImageDataset(samples, build_transforms(info["data_config"], train=False))


@app.command("eval", context_settings=EXTRA)
def eval_(
    ctx: typer.Context,
    run_or_artifact: Annotated[Path, typer.Argument(help="run folder or artifact folder")],
    data: Annotated[
        str | None, typer.Option(help="dataset to evaluate on (default: the run's test split)")
    ] = None,
    data_kind: Annotated[str | None, typer.Option(help="folder, csv, medfmc, npz or digits")] = None,
    out: Annotated[Path | None, typer.Option(help="write the metrics as JSON here")] = None,
    uncalibrated: Annotated[
        bool, typer.Option("--uncalibrated", help="score the raw probabilities, not the stored calibration")
    ] = False,
) -> None:
    """Evaluate a trained artifact on a labelled dataset (every image in it) or on its run's test split."""
    from promptvit.train.clinical import evaluate_artifact

    try:
        model, info = _load_for_inference(run_or_artifact)
        dataset = _labelled_dataset(run_or_artifact, data, data_kind, ctx.args, info)
        metrics = evaluate_artifact(
            model, dataset, info, _artifact_dir(run_or_artifact), calibrated=not uncalibrated
        )
    except (*_user_errors(), ValueError) as error:
        _fail(error)
    if out:
        from promptvit.io import atomic_write_text

        atomic_write_text(out, json.dumps(metrics, indent=2) + "\n")
    console.print_json(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}))


@app.command()
def predict(
    artifact: Annotated[Path, typer.Argument(help="artifact folder (or run folder)")],
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    out: Annotated[Path, typer.Option(help="CSV of per-class probabilities")] = Path("predictions.csv"),
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 32,
    uncalibrated: Annotated[
        bool, typer.Option("--uncalibrated", help="raw probabilities, not the stored calibration/thresholds")
    ] = False,
) -> None:
    """Write per-class probabilities for each image to a CSV: softmax (or sigmoid for multi-label) of the
    logits calibrated as stored in the artifact, and the decision at its stored thresholds."""
    import torch

    from promptvit.data import IMAGE_EXTENSIONS, build_transforms, load_image
    from promptvit.data.sources import LabeledSamples, Sample
    from promptvit.io import atomic_write
    from promptvit.train.clinical import artifact_probabilities, predicted_labels

    try:
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
        transform = build_transforms(info["data_config"], train=False)
        rows = []
        with torch.inference_mode():
            for start in range(0, len(files), batch_size):
                chunk = samples.items[start : start + batch_size]
                batch = torch.stack([transform(load_image(s, samples)) for s in chunk])
                scores = artifact_probabilities(
                    model(batch), info, _artifact_dir(artifact), calibrated=not uncalibrated
                )
                labels = predicted_labels(scores, info, calibrated=not uncalibrated)
                rows += [
                    [s.path, *map(float, row), label]
                    for s, row, label in zip(chunk, scores.tolist(), labels, strict=True)
                ]
    except (*_user_errors(), FileNotFoundError) as error:
        _fail(error)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", *names, "prediction"])
            for row in rows:
                writer.writerow([row[0], *(f"{p:.6f}" for p in row[1:-1]), row[-1]])

    atomic_write(out, write)
    console.print(f"wrote {len(rows)} predictions to {out}")


@app.command(context_settings=EXTRA)
def analyze(
    ctx: typer.Context,
    run_or_artifact: Annotated[Path, typer.Argument(help="run folder or artifact folder")],
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
) -> None:
    """Why it works: calibration, prompt/patch NMI, CKA, attention distance and maps, as PNGs + analysis.json."""
    from promptvit.analysis import analyze as run_analysis
    from promptvit.train.clinical import artifact_calibration

    try:
        model, info = _load_for_inference(run_or_artifact)
        dataset = _labelled_dataset(run_or_artifact, data, data_kind, ctx.args, info)
        loaded = {path.name: (path, _load_for_inference(path)) for path in compare or []}
        others = {name: model_info[0] for name, (_, model_info) in loaded.items()}
        calibrations = {run_or_artifact.name: artifact_calibration(info, run_or_artifact)}
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
            name=run_or_artifact.name,
            calibrations=calibrations,
        )
    except (*_user_errors(), ValueError) as error:
        _fail(error)
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
    from promptvit.io import atomic_write_text

    options = {k.removeprefix("backbone."): v for k, v in parse_extra_args(ctx.args).items()}
    options.setdefault("img_size", image_size)
    factory = functools.partial(create_backbone, backbone, **options)
    try:
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
    except _user_errors() as error:
        _fail(error)
    table = efficiency_table(rows)
    atomic_write_text(out / "efficiency.md", table + "\n")
    atomic_write_text(out / "efficiency.json", json.dumps(rows, indent=2, default=str) + "\n")
    plot_efficiency(rows, out / "efficiency.png")
    console.print(table)
    console.print(f"wrote {out}/efficiency.md, efficiency.json and efficiency.png")


@app.command()
def methods() -> None:
    """List every registered method with its options, defaults and source paper."""
    from promptvit.methods import available_methods, get_method

    table = Table(title="promptvit methods")
    for column in ("method", "backbones", "options (defaults)", "paper"):
        table.add_column(column, overflow="fold")
    for name in available_methods():
        cls = get_method(name)
        options = ", ".join(
            f"{f.name}={f.default if f.default is not dataclasses.MISSING else f.default_factory()}"
            for f in dataclasses.fields(cls.config_class)
        )
        table.add_row(name, "/".join(cls.supported_kinds), options or "-", cls.paper)
    console.print(table)


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
    except _user_errors() as error:
        _fail(error)
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


from promptvit.cli.protocol_commands import register_protocol_commands  # noqa: E402

register_protocol_commands(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume from the last checkpoint")
        sys.exit(130)
