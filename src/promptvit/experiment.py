"""The run pipeline: one training run from a validated config: data -> backbone + method -> fit -> test -> run folder.

``run_pipeline`` is the one run every caller shares: ``run_experiment`` (``promptvit train``, the demo)
and each sweep run (``protocols.runner.execute``). It is plain Python so notebooks can call it too. The
config it runs is a :class:`~promptvit.run_config.RunConfig`; its sections build themselves where they are
defined (``backbones.spec``, ``data.spec``, ``train.config``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from promptvit.analysis_callbacks import NMILogger
from promptvit.artifact import default_data_config
from promptvit.backbones.spec import BackboneSpec, backbone_init, build_backbone, warn_if_random_init
from promptvit.cache import PrefixCache
from promptvit.data import FewShotSplit, ImageDataset, build_transforms
from promptvit.data.check import guard_duplicates, split_summary_line
from promptvit.data.fewshot import warn_untrained_classes
from promptvit.data.manifest import SPLIT_FILES, record_split
from promptvit.data.spec import make_split, sample_groups
from promptvit.environment import environment
from promptvit.io import LOCK_FILE, atomic_write_text, exclusive_folder, output_folder
from promptvit.methods.base import ConfigError
from promptvit.model import PromptModel, wrap
from promptvit.run_config import RunConfig, resolved_data
from promptvit.train import FitResult, distributed, evaluate, fit
from promptvit.train.callbacks import log_test_scalars
from promptvit.train.clinical import test_with_calibration


def build_model(config: RunConfig, num_classes: int) -> PromptModel:
    """Backbone plus method; the new head and method parameters are drawn from the run's seed."""
    backbone = build_backbone(config.backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        return wrap(backbone, config.method.name, num_classes=num_classes, **config.method.options)


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

    ``data.kind: auto`` is resolved first (``data.spec.resolve_data_spec``), so the run folder's name and
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
