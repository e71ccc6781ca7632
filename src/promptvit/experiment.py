"""One training run from a validated config: data -> backbone + method -> fit -> test -> run folder.

``run_pipeline`` is the one run every caller shares: ``run_experiment`` (``promptvit train``, the demo)
and each sweep run (``protocols.runner.execute``). It is plain Python so notebooks can call it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch.utils.data import DataLoader, Dataset

from promptvit._version import __version__
from promptvit.artifact import default_data_config
from promptvit.backbones import create_backbone
from promptvit.cache import PrefixCache
from promptvit.data import (
    FewShotSplit,
    ImageDataset,
    LabeledSamples,
    build_transforms,
    digits_demo,
    load_medfmc_split,
    make_few_shot_split,
    read_csv,
    read_image_folder,
    read_npz,
    sample_k_shot,
    sample_medfmc_k_shot,
    stratified_split,
)
from promptvit.data.check import guard_duplicates, split_summary_line
from promptvit.data.fewshot import warn_untrained_classes
from promptvit.data.manifest import SPLIT_FILES, record_split
from promptvit.io import atomic_write_text, check_run_name, exclusive_folder
from promptvit.methods.base import ConfigError, make_config
from promptvit.model import PromptModel, wrap
from promptvit.train import Callback, EvaluationConfig, FitResult, TrainConfig, distributed, evaluate, fit
from promptvit.train.clinical import sample_groups, test_with_calibration

logger = logging.getLogger(__name__)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneSpec(Strict):
    """Which backbone: a timm name (``arch.tag``), optionally with local weights and build options."""

    name: str = Field(description="timm model name, e.g. vit_base_patch16_224.orig_in21k")
    pretrained: bool = Field(False, description="download pretrained weights from the Hugging Face hub")
    weights: str | None = Field(
        None, description="local weights file (.safetensors or .pth) instead of the hub"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="timm build options (img_size, depth...)"
    )
    allow_pickle: bool = Field(
        False, description="trust a .pth weights file holding arbitrary pickled objects"
    )
    mean: list[float] | None = Field(
        None, description="input normalisation mean (default: the model's config)"
    )
    std: list[float] | None = Field(None, description="input normalisation std (default: the model's config)")
    image_size: int | None = Field(
        None, ge=8, description="CNN input size (ViTs are fed the img_size they were built for)"
    )


class MethodSpec(Strict):
    name: str = "linear"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_method(self) -> MethodSpec:
        make_config(self.name, **self.options)  # raises ConfigError naming the bad option
        return self


class DataSpec(Strict):
    """Where the images are and how the few-shot split is drawn."""

    kind: Literal["folder", "csv", "medfmc", "npz", "digits", "list", "json"] = "folder"
    path: str | None = Field(None, description="folder root, CSV file, MedFMC root or .npz file")
    image_root: str | None = None
    file_column: str = "file"
    label_column: str = "label"
    label_columns: list[str] | None = None
    file_suffix: str = ""
    group_column: str | None = Field(
        None,
        description="CSV: column naming each image's patient, lesion or study; splits keep a group on one side",
    )
    dataset: Literal["chest", "colon", "endo", "neojaundice", "retino"] | None = Field(
        None, description="MedFMC dataset"
    )
    exp: int = Field(1, ge=1, description="MedFMC official experiment split (1..5)")
    shots: int | None = Field(None, ge=1, description="K images (or MedFMC studies) per class; None = all")
    classes: list[str] | None = Field(None, description="use only these classes, in this order")
    test_fraction: float | None = Field(0.3, gt=0, lt=1)
    val_per_class: int | None = Field(20, ge=1)
    skip_corrupt: bool = False
    allow_duplicates: bool = Field(
        False, description="train even when identical image files sit in two of train/val/test"
    )
    train_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="RandomResizedCrop area range for training"
    )
    hflip: bool = Field(True, description="random horizontal flips for training")
    augment: bool = Field(
        True,
        description="random augmentation for training; false uses the eval transform (required by cache_prefix)",
    )

    @field_validator("classes", "label_columns", mode="before")
    @classmethod
    def _names_from_numbers(cls, value: Any) -> Any:
        # `--data.classes [0,1]` reads as YAML numbers; folder and column names are text.
        if isinstance(value, list):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        return value

    @model_validator(mode="after")
    def _needs_path(self) -> DataSpec:
        if self.kind != "digits" and not self.path:
            raise ValueError(f"data.path is required when data.kind is {self.kind} (--data PATH)")
        if self.kind == "medfmc" and self.classes:
            raise ValueError(
                "data.classes does not apply to MedFMC, whose classes are fixed by the benchmark"
            )
        if self.kind == "medfmc" and (self.dataset is None or self.shots is None):
            raise ValueError(
                "data.kind=medfmc needs data.dataset (chest, colon, endo) and data.shots (1, 5, 10)"
            )
        return self


class RunConfig(Strict):
    backbone: BackboneSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output_dir: str = "runs"
    name: str | None = Field(None, description="run folder name (default: method-shots-seed)")

    @field_validator("name")
    @classmethod
    def _name_stays_in_output_dir(cls, name: str | None) -> str | None:
        return check_run_name(name) if name is not None else None

    def run_dir(self) -> Path:
        shots = f"{self.data.shots}shot" if self.data.shots else "all"
        return Path(self.output_dir) / (self.name or f"{self.method.name}-{shots}-seed{self.train.seed}")


def load_samples(spec: DataSpec) -> LabeledSamples:
    """Read the labelled pool a generic split is drawn from (not used for MedFMC's official lists)."""
    if spec.kind == "digits":
        return digits_demo()
    if spec.kind == "folder":
        return read_image_folder(spec.path)
    if spec.kind == "csv":
        return read_csv(
            spec.path,
            image_root=spec.image_root,
            file_column=spec.file_column,
            label_column=spec.label_column,
            label_columns=spec.label_columns,
            file_suffix=spec.file_suffix,
            group_column=spec.group_column,
        )
    raise ValueError(f"data.kind {spec.kind} has its own splits")


def _select(samples: LabeledSamples, spec: DataSpec) -> LabeledSamples:
    return samples.select_classes(spec.classes) if spec.classes else samples


def make_split(spec: DataSpec, seed: int) -> FewShotSplit:
    """Train/val/test for one run; validation is always disjoint from training."""
    if spec.kind == "medfmc":
        return load_medfmc_split(spec.path, spec.dataset, spec.shots, spec.exp)
    if spec.kind == "npz":
        train, val, test = (_select(read_npz(spec.path, split), spec) for split in ("train", "val", "test"))
        if spec.shots:
            train = (
                sample_k_shot(train, spec.shots, seed)
                if not train.multilabel
                else sample_medfmc_k_shot(train, spec.shots, seed, dataset=None)
            )
        return FewShotSplit(train=train, val=val, test=test)
    samples = _select(load_samples(spec), spec)
    if spec.shots:
        return make_few_shot_split(
            samples, spec.shots, seed, test_fraction=spec.test_fraction, val_per_class=spec.val_per_class
        )
    # All data: a stratified test split, then 10% of the rest for validation.
    pool, test = stratified_split(samples, test_fraction=spec.test_fraction, seed=seed)
    train, val = stratified_split(pool, test_fraction=0.1, seed=seed + 1)
    return FewShotSplit(train=train, val=val, test=test)


def build_model(config: RunConfig, num_classes: int) -> PromptModel:
    """Backbone plus method; the new head and method parameters are drawn from the run's seed."""
    spec = config.backbone
    backbone = create_backbone(
        spec.name,
        pretrained=spec.pretrained,
        weights=spec.weights,
        allow_pickle=spec.allow_pickle,
        **spec.options,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        return wrap(backbone, config.method.name, num_classes=num_classes, **config.method.options)


def backbone_init(spec: BackboneSpec) -> str:
    """``pretrained`` (hub), ``weights`` (a local file) or ``random``: recorded with every run."""
    return "weights" if spec.weights else "pretrained" if spec.pretrained else "random"


def warn_if_random_init(spec: BackboneSpec) -> None:
    if backbone_init(spec) == "random":
        logger.warning(
            "the backbone '%s' is randomly initialised (no --pretrained or --weights): results will say "
            "little about a pretrained model; this run is marked backbone_init: random",
            spec.name,
        )


def data_config_for(model: PromptModel, spec: BackboneSpec) -> dict[str, Any]:
    """Input size from the model as built (timm's pretrained_cfg may still say 224), stats from its config."""
    data_config = default_data_config(model)
    if spec.image_size is not None:
        if model.geometry.kind == "vit":
            raise ConfigError(
                "backbone.image_size is for CNNs; build a ViT for another size with backbone.options.img_size"
            )
        data_config["input_size"] = (3, spec.image_size, spec.image_size)
    if spec.mean is not None:
        data_config["mean"] = tuple(spec.mean)
    if spec.std is not None:
        data_config["std"] = tuple(spec.std)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}


def environment() -> dict[str, str]:
    """Versions and commit recorded with every run, so results can be traced."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "promptvit": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "git_commit": commit or "unknown",
    }


def run_experiment(config: RunConfig, *, resume: bool = True) -> dict[str, Any]:
    """Train with model selection on validation, then test the selected model once; returns metrics.json."""
    run_dir = config.run_dir()
    # Under torchrun only rank 0 writes run files (and holds the folder's lock); see train.distributed.
    with exclusive_folder(run_dir) if distributed.is_writer() else contextlib.nullcontext():
        return _run_locked(config, run_dir, resume)


class NMILogger(Callback):
    """``train.log_nmi``: after every epoch, the prompt/patch NMI of each prompted block (``analysis.nmi``)
    on a fixed batch of up to ``count`` validation (else training) images, as ``nmi_block<i>`` columns.

    Blocks without prompt tokens are left out, so methods without prompts log nothing.
    """

    config_flag = "log_nmi"

    def __init__(self, count: int = 32) -> None:
        self.count = count
        self.images: torch.Tensor | None = None

    def on_fit_start(self, model: PromptModel, train_set: Dataset, val_set: Dataset | None) -> None:
        data = val_set if val_set is not None else train_set
        if len(data):
            self.images = next(iter(DataLoader(data, batch_size=self.count, shuffle=False)))[0]

    def on_epoch_end(self, model: PromptModel, epoch: int) -> dict[str, Any]:
        if self.images is None or model.geometry.kind != "vit":
            return {}
        from promptvit.analysis.nmi import layer_nmi  # here: the analysis package imports matplotlib

        means = layer_nmi(model, self.images)["mean"]
        return {f"nmi_block{index}": float(value) for index, value in enumerate(means) if value is not None}


@dataclasses.dataclass
class RunOutcome:
    """What ``run_pipeline`` leaves behind besides the run folder."""

    model: PromptModel
    fit: FitResult
    #: metrics of the one evaluated split, at the selected epoch
    metrics: dict[str, Any]
    data_config: dict[str, Any]
    environment: dict[str, str]
    #: whether training continued from a checkpoint found in the run folder
    resumed: bool
    seconds: float


def run_pipeline(
    config: RunConfig,
    split: FewShotSplit,
    run_dir: Path,
    *,
    evaluate_on: Literal["val", "test"] = "test",
    select_on_val: bool = True,
    augment: bool | None = None,
    data_config_overrides: dict[str, Any] | None = None,
    artifact_info: dict[str, Any] | None = None,
    fingerprint: dict[str, Any] | None = None,
    resume: bool = True,
    versions: dict[str, str] | None = None,
    main_metric: str | None = None,
) -> RunOutcome:
    """The one run: record config and data -> build -> fit (resumable) -> evaluate one split once.

    ``promptvit train``, the demo and every sweep run come through here, so they share the prefix cache,
    the precision, ``skipped_files.txt`` and the environment record. ``select_on_val`` picks the epoch on
    the validation set (else the last epoch is kept); ``evaluate_on="val"`` scores only the validation
    set and never builds a dataset of the test images. A test pass first fits the calibration and the
    decision thresholds on the validation set (``train.clinical``; stored in the artifact) and reports
    ``main_metric`` (default: the selection metric) with its bootstrap interval. ``augment`` defaults to
    ``config.data.augment``; ``versions`` to ``environment()`` (read once per run).
    """
    writes = distributed.is_writer()  # under torchrun only rank 0 writes run files
    digests = guard_duplicates(split, config.data.allow_duplicates)
    line = split_summary_line(split)
    if writes:
        atomic_write_text(
            run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        )
        if config.train.progress:
            print(line, flush=True)
        atomic_write_text(run_dir / "data.txt", line + "\n" + split.summary() + "\n")
        warn_untrained_classes(split)
        warn_if_random_init(config.backbone)
        recorded = record_split(split, digests)
        if recorded is not None:  # `eval RUN` scores exactly these files later
            atomic_write_text(run_dir / SPLIT_FILES, json.dumps(recorded) + "\n")
    started = time.perf_counter()
    model = build_model(config, split.train.num_classes)
    data_config = {**data_config_for(model, config.backbone), **(data_config_overrides or {})}
    augment = config.data.augment if augment is None else augment
    augment = augment and not model.method.fits_head_to_convergence()  # a probe fits unaugmented features
    parts = {"train": split.train}
    if (select_on_val and len(split.val)) or evaluate_on == "val":
        parts["val"] = split.val
    parts[evaluate_on] = getattr(split, evaluate_on)
    datasets = {
        name: ImageDataset(
            part,
            build_transforms(
                data_config,
                train=name == "train" and augment,
                train_scale=config.data.train_scale,
                hflip=config.data.hflip,
            ),
            config.data.skip_corrupt,
        )
        for name, part in parts.items()
    }
    skipped = [f"{name}: {s}" for name, ds in datasets.items() for s in ds.skipped]
    if skipped and writes:
        atomic_write_text(run_dir / "skipped_files.txt", "\n".join(skipped) + "\n")
    # One cache serves training, validation and the final pass (and sweeps that share the cut).
    cache = PrefixCache(config.train.cache_dir) if config.train.cache_prefix else None
    versions = versions if versions is not None else environment()
    resumed = resume and (run_dir / "checkpoint" / "checkpoint.json").is_file()
    result = fit(
        model,
        datasets["train"],
        datasets["val"] if select_on_val and len(split.val) else None,
        config=config.train,
        run_dir=run_dir,
        multilabel=split.train.multilabel,
        class_names=split.train.class_names,
        extra_artifact_info={"data_config": data_config, "environment": versions, **(artifact_info or {})},
        resume=resume,
        fingerprint=fingerprint,
        prefix_cache=cache,
        callbacks=[NMILogger()] if config.train.log_nmi else [],
        ece_bins=config.evaluation.ece_bins,
    )
    if evaluate_on == "val" and select_on_val and result.val_metrics is not None:
        metrics = result.val_metrics  # the selected epoch's validation metrics, as fit computed them
    elif evaluate_on == "test":  # calibration and thresholds fitted on val, then the one test pass
        groups, group_rule = sample_groups(split.test, config.data)
        val_set = datasets.get("val")
        metrics = test_with_calibration(
            model,
            datasets["test"],
            val_set if val_set is not None and len(val_set) else None,
            multilabel=split.train.multilabel,
            class_names=split.train.class_names,
            main_metric=main_metric
            or config.train.select_metric
            or ("map" if split.train.multilabel else "accuracy"),
            batch_size=config.train.eval_batch_size,
            artifact_dir=result.artifact_dir if writes else None,
            groups=groups,
            group_rule=group_rule,
            options=config.evaluation,
            prefix_cache=cache,
            precision=config.train.precision,
        )
    else:
        metrics = evaluate(
            model,
            datasets[evaluate_on],
            multilabel=split.train.multilabel,
            class_names=split.train.class_names,
            batch_size=config.train.eval_batch_size,
            prefix_cache=cache,
            precision=config.train.precision,
            bins=config.evaluation.ece_bins,
        )
    return RunOutcome(
        model, result, metrics, data_config, versions, resumed, round(time.perf_counter() - started, 2)
    )


def _run_locked(config: RunConfig, run_dir: Path, resume: bool) -> dict[str, Any]:
    split = make_split(config.data, config.train.seed)
    outcome = run_pipeline(config, split, run_dir, resume=resume)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.update(
        test=outcome.metrics,
        test_split=split.test.source,
        num_train=len(split.train),
        num_val=len(split.val),
        num_test=len(split.test),
        seconds_total=outcome.seconds,
        environment=outcome.environment,
        backbone_init=backbone_init(config.backbone),
    )
    if distributed.is_writer():
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
