"""Execute one :class:`RunSpec` and record it: ``experiment.run_pipeline`` (build -> fit, resumable ->
evaluate ONE split), then the record.

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

from promptvit.backbones.spec import backbone_init
from promptvit.environment import environment
from promptvit.errors import OutputError, ResumeError, TrainingError
from promptvit.experiment import run_pipeline
from promptvit.protocols.spec import RunSpec, config_hash, train_hash
from promptvit.protocols.splits import materialise
from promptvit.protocols.store import RECORD_FORMAT, ResultStore


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


def execute(
    spec: RunSpec,
    run_dir: str | Path,
    *,
    threads: int | None = None,
    versions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train and evaluate ``spec`` in ``run_dir`` (resuming a checkpoint there); return the record body."""
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    split = materialise(spec)
    evaluated = split.val if spec.evaluate_on == "val" else split.test
    if not len(evaluated):
        raise ValueError(f"{spec.describe()}: the {spec.evaluate_on} set is empty")
    use_val = spec.epoch_selection == "val"
    if use_val and not len(split.val):
        raise ValueError(f"{spec.describe()}: epoch selection on val needs a non-empty validation set")
    overrides: dict[str, Any] = {}
    if spec.eval_resize == "direct":
        overrides["crop_pct"] = 1.0
    if spec.interpolation:
        overrides["interpolation"] = spec.interpolation
    metric = resolve_metric(spec, split.train.multilabel)
    outcome = run_pipeline(
        spec.config,
        split,
        run_dir,
        evaluate_on=spec.evaluate_on,
        select_on_val=use_val,
        augment=spec.augment,
        data_config_overrides=overrides,
        artifact_info={
            "protocol": {"name": spec.protocol, "task": spec.task, "shots": spec.shots, "split": spec.split}
        },
        fingerprint={"train_hash": train_hash(spec)},
        resume=True,
        versions=versions,
        main_metric=metric,
    )
    model, result, metrics = outcome.model, outcome.fit, outcome.metrics
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
        "prompted_depth": model.method.prompted_depth(model.config, model.geometry.depth),
        "backbone_depth": model.geometry.depth,
        "num_classes": split.train.num_classes,
        "multilabel": split.train.multilabel,
        "sizes": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "data": {"train": split.train.source, "val": split.val.source, "evaluated": evaluated.source},
        "resumed": outcome.resumed,
        "fit_seconds": outcome.seconds,
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
        "backbone_init": backbone_init(spec.config.backbone),
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
        versions = environment()  # asks git once per run
        try:
            body = execute(spec, store.run_dir(record["train_hash"]), threads=threads, versions=versions)
            record.update(status="ok", error=None, **body)
        except OutputError:  # the results disk (full, read-only), not this run: stop the sweep, record nothing
            raise
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
        record["environment"] = versions
        if record["status"] == "failed":
            store.add_failure(record)
            return "failed"
        return record["status"] if store.add(record) else "duplicate"
