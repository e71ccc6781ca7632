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
from promptvit.backbones import create_backbone, geometry_of
from promptvit.cache import PrefixCache
from promptvit.data import (
    DataError,
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
from promptvit.data.check import (
    align_classes,
    detect_layout,
    guard_duplicates,
    read_layout,
    split_summary_line,
)
from promptvit.data.fewshot import (
    cap_per_class,
    check_classifiable,
    holdout_validation,
    warn_untrained_classes,
)
from promptvit.data.manifest import SPLIT_FILES, record_split
from promptvit.data.sources import MEDFMC_CLASSES, medfmc_split_files, read_medfmc_list
from promptvit.data.split_files import is_fewshot_folder, read_fewshot_folder
from promptvit.io import LOCK_FILE, atomic_write_text, check_run_name, exclusive_folder, output_folder
from promptvit.methods.base import ConfigError, make_config
from promptvit.model import PromptModel, wrap
from promptvit.train import Callback, EvaluationConfig, FitResult, TrainConfig, distributed, evaluate, fit
from promptvit.train.callbacks import log_test_scalars
from promptvit.train.clinical import sample_groups, test_with_calibration
from promptvit.validation import whole_number

logger = logging.getLogger(__name__)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN/inf in no float option


#: timm build options that are counts or sizes (checked when they are given: >= 1, whole numbers)
SIZE_OPTIONS = ("depth", "img_size", "patch_size", "embed_dim", "num_heads", "num_classes")


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

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, value: list[float] | None, info: Any) -> list[float] | None:
        if value is not None and (len(value) != 3 or (info.field_name == "std" and min(value) <= 0)):
            raise ValueError(f"give 3 values, one per RGB channel{', all > 0' if info.field_name == 'std' else ''}")
        return value

    @field_validator("options")
    @classmethod
    def _build_sizes(cls, options: dict[str, Any]) -> dict[str, Any]:
        for name in SIZE_OPTIONS:
            value = options.get(name)
            sizes = value if isinstance(value, (list, tuple)) and name in ("img_size", "patch_size") else [value]
            if value is not None and not all(whole_number(v) and v >= 1 for v in sizes):
                raise ValueError(f"backbone.{name} must be a whole number >= 1, got {value!r}")
        return options


class MethodSpec(Strict):
    name: str = "linear"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_method(self) -> MethodSpec:
        make_config(self.name, **self.options)  # raises ConfigError naming the bad option
        return self


#: what ``data.kind`` (``--data-kind``) may be; 'auto' detects it from the files at ``data.path``
DATA_KINDS = (
    "auto",
    "folder",
    "csv",
    "npz",
    "fewshot",
    "lists",
    "splits",
    "vtab",
    "fgvc",
    "medfmc",
    "digits",
)
#: kinds whose data comes with its own train/val/test split (``eval --data`` scores their test split)
SPLIT_KINDS = ("npz", "fewshot", "lists", "splits", "vtab", "fgvc", "medfmc")
#: named splits of the fixed-split layouts (``promptvit.data.check.read_layout``): train, val, test
_FIXED_SPLITS = {
    "lists": ("train", "val", "test"),
    "splits": ("train", "val", "test"),
    "fgvc": ("train", "val", "test"),
    "vtab": ("train800", "val200", "test"),
}


class DataSpec(Strict):
    """Where the images are and how the few-shot split is drawn."""

    # 'list' and 'json' are single split files, used by the VTAB-1k and FGVC protocols' fixed sources
    kind: Literal[DATA_KINDS + ("list", "json")] = Field(  # type: ignore[valid-type]
        "auto", description="auto (detected from data.path), " + ", ".join(DATA_KINDS[1:])
    )
    path: str | None = Field(None, description="image folder, CSV, .npz, split folder or MedFMC root")
    image_root: str | None = None
    file_column: str = "file"
    label_column: str = "label"
    label_columns: list[str] | None = None
    file_suffix: str = ""
    group_column: str | None = Field(
        None,
        description="CSV: column naming each image's patient, lesion or study; splits keep a group on one side",
    )
    dataset: str | None = Field(
        None,
        description="MedFMC data set (chest, colon, endo, neojaundice, retino), or the name of a folder "
        "written by `promptvit data fewshot --format medfmc`",
    )
    exp: int = Field(1, ge=1, description="MedFMC experiment split (1..5), or the exp of a fewshot folder")
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

    @field_validator("train_scale")
    @classmethod
    def _crop_area_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"[{low}, {high}] is not an area range: RandomResizedCrop needs 0 < min <= max <= 1, e.g. [0.08, 1]"
            )
        return value

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
        if self.classes is not None and not self.classes:
            raise ValueError("data.classes is empty; leave it out to use every class, or list the classes")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes repeats a class: {self.classes}")
        if self.kind == "medfmc" and self.classes:
            raise ValueError(
                "data.classes does not apply to MedFMC, whose classes are fixed by the benchmark"
            )
        if self.kind == "medfmc" and self.dataset is None:
            raise ValueError("data.kind=medfmc needs data.dataset (chest, colon, endo, neojaundice, retino)")
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
        """``output_dir/name``; by default ``method-Kshot-seedS``, with ``-expE`` for data that comes in exps
        (MedFMC, ``data fewshot`` folders), so two exps of one K never share (and resume) one folder."""
        shots = f"{self.data.shots}shot" if self.data.shots else "all"
        exp = f"-exp{self.data.exp}" if self.data.kind in ("medfmc", "fewshot") else ""
        return Path(self.output_dir) / (self.name or f"{self.method.name}-{shots}{exp}-seed{self.train.seed}")


def _fewshot_location(path: Path, dataset: str | None) -> Path | None:
    """A ``data fewshot`` folder named by ``path`` (or ``path/dataset``) whose name is ``dataset``, else None."""
    for candidate in (path, path / dataset) if dataset else (path,):
        if is_fewshot_folder(candidate):
            folder, _ = read_fewshot_folder(candidate)
            if dataset is None or folder.name == dataset:
                return candidate
    return None


def resolve_data_spec(spec: DataSpec) -> DataSpec:
    """``spec`` with ``kind: auto`` replaced by the layout found at ``data.path``, and what a split folder
    fixes filled in (the K and exp of a ``{K}-shot/seed{S}`` folder, the K of a fewshot folder with one K),
    so that the recorded config says what the run used. MedFMC names outside the benchmark's five are looked
    up as ``promptvit data fewshot --format medfmc`` folders."""
    update: dict[str, Any] = {}
    kind = spec.kind
    if kind == "auto":
        kind = detect_layout(spec.path)  # type: ignore[arg-type]
        if kind == "medfmc":  # a MedFMC data set folder (chest/ ...): the root is its parent
            base = Path(spec.path)  # type: ignore[arg-type]
            name = spec.dataset or base.name.lower()
            update.update(path=str(base.parent), dataset=name)
        update["kind"] = kind
    if kind == "medfmc" and spec.dataset not in MEDFMC_CLASSES:
        found = _fewshot_location(Path(spec.path), spec.dataset)  # type: ignore[arg-type]
        if found is None:
            raise DataError(
                f"MedFMC data set '{spec.dataset}' is not one of {list(MEDFMC_CLASSES)}, and {spec.path} holds no "
                f"folder of that name written by `promptvit data fewshot --format medfmc --name {spec.dataset}`"
            )
        kind = "fewshot"
        update.update(kind=kind, path=str(found))
    if kind == "fewshot":
        folder, draw = read_fewshot_folder(update.get("path", spec.path))
        shots, exp = draw if draw is not None else (spec.shots, spec.exp)
        if draw is not None and spec.shots not in (None, shots):
            raise DataError(f"{spec.path} is the {shots}-shot draw, but data.shots is {spec.shots}")
        if shots is None and len(folder.shots) == 1:
            shots = folder.shots[0]
        if shots is None:
            raise DataError(
                f"{folder.root} holds K in {folder.shots}: choose one with --shots (and --data.exp 1.."
                f"{len(folder.seeds)} for the draw)"
            )
        update.update(shots=shots, exp=exp)
    return spec.model_copy(update=update) if update else spec


def resolved_data(config: RunConfig) -> RunConfig:
    """``config`` with its data section resolved (:func:`resolve_data_spec`)."""
    return config.model_copy(update={"data": resolve_data_spec(config.data)})


def load_samples(spec: DataSpec) -> LabeledSamples:
    """Read the labelled pool a generic split is drawn from (folder, CSV, the digits); other kinds come with
    their own splits (:func:`make_split`, :func:`evaluation_samples`)."""
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
    raise DataError(
        f"data.kind {spec.kind} has its own train/val/test splits; use make_split or evaluation_samples"
    )


def evaluation_samples(spec: DataSpec) -> LabeledSamples:
    """What ``promptvit eval --data`` scores: the test split of data that has one, else every image."""
    spec = resolve_data_spec(spec)
    if spec.kind == "npz":
        return _select(read_npz(spec.path, "test"), spec)
    if spec.kind == "fewshot":
        return _select(read_fewshot_folder(spec.path)[0].test(), spec)
    if spec.kind == "medfmc":
        files = medfmc_split_files(spec.path, spec.dataset, spec.shots or 1, spec.exp, need_train=False)
        return read_medfmc_list(files.test, spec.dataset, files.image_root)
    if spec.kind in _FIXED_SPLITS:
        return _fixed_split(spec, seed=0).test
    return _select(load_samples(spec), spec)


def _select(samples: LabeledSamples, spec: DataSpec) -> LabeledSamples:
    return samples.select_classes(spec.classes) if spec.classes else samples


def _fixed_split(spec: DataSpec, seed: int) -> FewShotSplit:
    """Train/val/test of a layout that has them (a ``train.txt``/``val.txt``/``test.txt`` folder, ``train/
    val/ test/`` class folders, a VTAB-1k task, an FGVC data set); K per class drawn from train with
    ``data.shots``, validation held out of train when the layout has none."""
    layout = read_layout(spec.path, spec.kind)  # type: ignore[arg-type]
    names = _FIXED_SPLITS[spec.kind]
    missing = [n for n in (names[0], names[2]) if n not in layout.splits]
    if missing:
        raise DataError(f"{spec.path}: no {' or '.join(missing)} split in this {spec.kind} layout")
    parts = align_classes({n: layout.splits[n] for n in names if n in layout.splits})
    train, test = _select(parts[names[0]], spec), _select(parts[names[2]], spec)
    val = _select(parts[names[1]], spec) if names[1] in parts else None
    if spec.shots:
        drawn = sample_medfmc_k_shot(train, spec.shots, seed, dataset=None)
        if val is None:
            val = holdout_validation(train, drawn)
            val = cap_per_class(val, spec.val_per_class, seed + 1) if spec.val_per_class and len(val) else val
        train = drawn
    elif val is None:
        train, val = stratified_split(train, test_fraction=0.1, seed=seed + 1)
    return FewShotSplit(train=train, val=val, test=test)


def make_split(spec: DataSpec, seed: int) -> FewShotSplit:
    """Train/val/test for one run; validation is always disjoint from training."""
    spec = resolve_data_spec(spec)
    if spec.kind == "medfmc":
        if spec.shots is None:
            raise DataError("data.kind=medfmc needs data.shots (1, 5, 10): --shots K")
        split = load_medfmc_split(spec.path, spec.dataset, spec.shots, spec.exp)
    elif spec.kind == "fewshot":
        split = read_fewshot_folder(spec.path)[0].split(spec.shots, spec.exp)  # type: ignore[arg-type]
        split = FewShotSplit(*(_select(part, spec) for part in (split.train, split.val, split.test)))
    elif spec.kind in _FIXED_SPLITS:
        split = _fixed_split(spec, seed)
    elif spec.kind == "npz":
        train, val, test = (_select(read_npz(spec.path, part), spec) for part in ("train", "val", "test"))
        if spec.shots:
            train = (
                sample_k_shot(train, spec.shots, seed)
                if not train.multilabel
                else sample_medfmc_k_shot(train, spec.shots, seed, dataset=None)
            )
        split = FewShotSplit(train=train, val=val, test=test)
    else:
        samples = _select(load_samples(spec), spec)
        check_classifiable(samples)
        if spec.shots:
            return make_few_shot_split(
                samples, spec.shots, seed, test_fraction=spec.test_fraction, val_per_class=spec.val_per_class
            )
        # All data: a stratified test split, then 10% of the rest for validation.
        pool, test = stratified_split(samples, test_fraction=spec.test_fraction, seed=seed)
        train, val = stratified_split(pool, test_fraction=0.1, seed=seed + 1)
        return FewShotSplit(train=train, val=val, test=test)
    check_classifiable(split.train)
    return split


def check_patch_grid(backbone: torch.nn.Module) -> None:
    """A ViT's patch must fit its image a whole number of times (``ConfigError`` naming both sizes).

    A patch larger than the image leaves no tokens; an image that is not a multiple of the patch would have
    its last rows and columns silently dropped.
    """
    geometry = geometry_of(backbone)
    if geometry.kind != "vit" or geometry.dynamic_img_size:
        return
    for image, patch in zip(geometry.img_size, geometry.patch_size, strict=True):
        if patch > image or image % patch:
            fits = max(patch, image // patch * patch)
            raise ConfigError(
                f"backbone.patch_size {patch} does not tile backbone.img_size {image}: the image must be a "
                f"multiple of the patch (e.g. --backbone.img-size {fits}, or a smaller --backbone.patch-size)"
            )


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
    check_patch_grid(backbone)
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


#: what a run folder holds; an older promptvit wrote these before folders were marked (``io.output_folder``)
RUN_FOLDER_NAMES = (
    LOCK_FILE,
    "config.yaml",
    "data.txt",
    SPLIT_FILES,
    "skipped_files.txt",
    "log.csv",
    "checkpoint",
    "artifact",
    "metrics.json",
    "tensorboard",
)


def run_inputs(config: RunConfig) -> list[str]:
    """What a run reads from disk: no run folder may be written inside them."""
    paths = (config.data.path, config.data.image_root, config.backbone.weights)
    return [p for p in paths if p and Path(p).exists()]


def run_experiment(config: RunConfig, *, resume: bool = True) -> dict[str, Any]:
    """Train with model selection on validation, then test the selected model once; returns metrics.json.

    ``data.kind: auto`` is resolved first (:func:`resolve_data_spec`), so the run folder's name and
    ``config.yaml`` say which layout, K and exp the run used. The run folder is new, or one promptvit made
    for a run (resumed); see ``io.output_folder``."""
    config = resolved_data(config)
    run_dir = config.run_dir()
    config.train.resolve_device()  # a device this machine does not have is refused before anything is read
    # Under torchrun only rank 0 writes run files (and holds the folder's lock); see train.distributed.
    writes = distributed.is_writer()
    if writes:
        output_folder(run_dir, "run", inputs=run_inputs(config), legacy=RUN_FOLDER_NAMES)
    with exclusive_folder(run_dir) if writes else contextlib.nullcontext():
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
        if writes and config.train.log_tensorboard:
            log_test_scalars(run_dir, metrics, result.best_epoch)
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
