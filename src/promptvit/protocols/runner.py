"""Execute one :class:`RunSpec` and record it: build -> fit (resumable) -> evaluate ONE split -> record.

The protocol decides what is evaluated: a search-stage run evaluates the validation set only (the test set
is never loaded into a dataset, let alone scored), a final run evaluates the test set once, at the epoch the
spec's rule chose (best validation epoch, or the last epoch for VTAB-1k). Every record says which split
chose its epoch and its hyperparameters (``selection``).
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

from promptvit.data import ImageDataset, build_transforms
from promptvit.experiment import build_model, data_config_for, environment
from promptvit.io import atomic_write_text
from promptvit.protocols.spec import RunSpec, config_hash, train_hash
from promptvit.protocols.splits import materialise
from promptvit.protocols.store import RECORD_FORMAT, ResultStore
from promptvit.train import ResumeError, TrainingError, evaluate, fit
from promptvit.train.clinical import sample_groups, test_with_calibration


def prompted_depth(method: str, options: dict[str, Any], depth: int) -> int | None:
    """Blocks that carry the method's prompts/modules: ``layers`` if given, VPT's deep flag, else None."""
    if "layers" in options:
        return len(options["layers"]) if options["layers"] is not None else depth
    if method == "vpt":
        return depth if options.get("deep", True) else 1
    return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def resolve_metric(spec: RunSpec, multilabel: bool) -> str:
    if spec.metric != "auto":
        return spec.metric
    return "map" if multilabel else "accuracy"


def _selection(spec: RunSpec, fit_selection: str) -> dict[str, Any]:
    epoch = "last epoch (no selection)" if spec.epoch_selection == "last" else f"val: {fit_selection}"
    if spec.stage == "search":
        hyper = "n/a (search-stage run, evaluated on val only)"
    else:
        hyper = spec.notes.get("hyperparameters", "fixed (given in the config, no search)")
    return {
        "epoch": epoch,
        "epoch_split": "val" if spec.epoch_selection == "val" else "last epoch",
        "hyperparameters": hyper,
        "hyperparameters_split": spec.notes.get("hyperparameters_split", "none (fixed)")
        if spec.stage == "final"
        else "n/a",
        "test_used_for_selection": False,
    }


def execute(spec: RunSpec, run_dir: str | Path, *, threads: int | None = None) -> dict[str, Any]:
    """Train and evaluate ``spec`` in ``run_dir`` (resuming a checkpoint there); return the record body."""
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = spec.config
    digest = train_hash(spec)
    started = time.perf_counter()
    split = materialise(spec)
    evaluated = split.val if spec.evaluate_on == "val" else split.test
    if not len(evaluated):
        raise ValueError(f"{spec.describe()}: the {spec.evaluate_on} set is empty")
    use_val = spec.epoch_selection == "val"
    if use_val and not len(split.val):
        raise ValueError(f"{spec.describe()}: epoch selection on val needs a non-empty validation set")
    atomic_write_text(
        run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    atomic_write_text(run_dir / "data.txt", split.summary() + "\n")

    model = build_model(config, split.train.num_classes)
    data_config = data_config_for(model, config.backbone)
    if spec.eval_resize == "direct":
        data_config["crop_pct"] = 1.0
    if spec.interpolation:
        data_config["interpolation"] = spec.interpolation
    eval_tf = build_transforms(data_config, train=False)
    train_tf = (
        build_transforms(
            data_config, train=True, train_scale=config.data.train_scale, hflip=config.data.hflip
        )
        if spec.augment
        else eval_tf
    )
    skip = config.data.skip_corrupt
    train_set = ImageDataset(split.train, train_tf, skip)
    val_set = ImageDataset(split.val, eval_tf, skip) if use_val else None
    resumed = (run_dir / "checkpoint" / "checkpoint.json").is_file()
    result = fit(
        model,
        train_set,
        val_set,
        config=config.train,
        run_dir=run_dir,
        multilabel=split.train.multilabel,
        class_names=split.train.class_names,
        extra_artifact_info={
            "data_config": data_config,
            "environment": environment(),
            "protocol": {"name": spec.protocol, "task": spec.task, "shots": spec.shots, "split": spec.split},
        },
        resume=True,
        fingerprint={"train_hash": digest},
    )
    fit_seconds = time.perf_counter() - started
    if spec.evaluate_on == "val" and use_val and result.val_metrics is not None:
        metrics = result.val_metrics  # the selected epoch's validation metrics, as fit computed them
    elif spec.evaluate_on == "test":  # calibration and thresholds on val, then the one test pass
        groups, group_rule = sample_groups(evaluated, config.data)
        metrics = test_with_calibration(
            model,
            ImageDataset(evaluated, eval_tf, skip),
            val_set,
            multilabel=split.train.multilabel,
            class_names=split.train.class_names,
            main_metric=resolve_metric(spec, split.train.multilabel),
            batch_size=config.train.eval_batch_size,
            artifact_dir=result.artifact_dir,
            groups=groups,
            group_rule=group_rule,
        )
    else:
        dataset = ImageDataset(evaluated, eval_tf, skip)
        metrics = evaluate(
            model,
            dataset,
            multilabel=split.train.multilabel,
            class_names=split.train.class_names,
            batch_size=config.train.eval_batch_size,
        )
    metric = resolve_metric(spec, split.train.multilabel)
    if metric not in metrics:
        raise ValueError(f"metric '{metric}' is not computed for this task; available: {sorted(metrics)}")
    options = model.config.to_dict()
    return {
        "metric": metric,
        "score": metrics[metric],
        "evaluated_on": spec.evaluate_on,
        "metrics": metrics,
        "val_metrics": result.val_metrics if spec.evaluate_on == "test" else None,
        "selection": _selection(spec, result.selection),
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "parameters": model.parameter_summary(),
        "method_name": model.method.name,
        "method_options": options,
        "prompt_length": options.get("prompt_length"),
        "prompted_depth": prompted_depth(model.method.name, options, model.geometry.depth),
        "backbone_depth": model.geometry.depth,
        "num_classes": split.train.num_classes,
        "multilabel": split.train.multilabel,
        "sizes": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "data": {"train": split.train.source, "val": split.val.source, "evaluated": evaluated.source},
        "resumed": resumed,
        "fit_seconds": round(fit_seconds, 3),
    }


def _base_record(spec: RunSpec, store: ResultStore) -> dict[str, Any]:
    digest = train_hash(spec)
    return {
        "format": RECORD_FORMAT,
        "config_hash": config_hash(spec),
        "train_hash": digest,
        "protocol": spec.protocol,
        "task": spec.task,
        "shots": spec.shots,
        "split": spec.split,
        "seed": spec.seed,
        "split_seed": spec.split_seed,
        "stage": spec.stage,
        "method": spec.method,
        "hparams": spec.hparams,
        "group": spec.group,
        "tags": spec.tags,
        "backbone": spec.config.backbone.name,
        "run_dir": os.path.relpath(store.run_dir(digest), store.root),
        "artifact": os.path.relpath(store.run_dir(digest) / "artifact", store.root),
        "spec": spec.model_dump(mode="json"),
        "notes": spec.notes,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def run_and_record(
    spec: RunSpec, store: ResultStore, *, threads: int | None = None, wait: bool = True
) -> str:
    """Run ``spec`` unless recorded; store its record. Returns 'skipped', 'ok', 'diverged', 'failed',
    'duplicate' (another writer recorded the same run meanwhile; nothing was overwritten) or, with
    ``wait=False``, 'busy' (another process is training the same run folder right now)."""
    digest = config_hash(spec)
    if store.has(digest):
        return "skipped"
    store.ensure()
    with store.lock(train_hash(spec), blocking=wait) as acquired:
        if not acquired:
            return "busy"
        if store.has(digest):  # recorded while we waited for the lock
            return "skipped"
        record = _base_record(spec, store)
        record["started_at"] = _now()
        started = time.perf_counter()
        try:
            body = execute(spec, store.run_dir(record["train_hash"]), threads=threads)
            record.update(status="ok", error=None, **body)
        except ResumeError as error:
            record.update(status="failed", error=f"{type(error).__name__}: {error}")
        except TrainingError as error:  # non-finite loss/parameters: a real outcome of this grid point
            record.update(status="diverged", error=f"{type(error).__name__}: {error}", score=None, metrics={})
        except Exception as error:  # noqa: BLE001 - every other failure is kept, then retried next sweep
            record.update(
                status="failed",
                error=f"{type(error).__name__}: {error}",
                traceback=traceback.format_exc(limit=8),
            )
        record["wall_seconds"] = round(time.perf_counter() - started, 3)
        record["finished_at"] = _now()
        record["environment"] = environment()
        if record["status"] == "failed":
            store.add_failure(record)
            return "failed"
        return record["status"] if store.add(record) else "duplicate"
