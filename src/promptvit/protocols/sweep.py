"""Sweeps: method presets x hyperparameter grids over a protocol, chosen on validation, run by a backend.

A sweep has two stages:

1. **search** (only for presets whose grid has more than one point): every grid point runs on the
   protocol's search units (train -> val; the test set is not loaded). For each (task, shots, preset) the
   point with the best mean validation score over the search units wins (ties: the smaller lr, then grid
   order). A point with a diverged run (non-finite loss) is out.
2. **final**: the chosen (or single, fixed) point runs on the final units (train -> test, evaluated once).

``report_over`` keeps some method options as separate arms instead of choosing them (e.g. one arm per EPT
prompt length for an "accuracy vs prompt length" plot; lr and weight decay are still chosen per arm).

Backends: ``inprocess`` (default, sequential), ``process`` (a local pool of ``workers`` processes),
``ray`` (Ray tasks on a local or existing cluster; ``pip install 'promptvit[ray]'``). Every backend writes
records through the same :class:`ResultStore`, so a killed sweep re-run with any backend skips what is done.

A sweep YAML (``promptvit sweep FILE.yaml``; relative paths are relative to the working directory,
``${NAME}`` is replaced from ``--var NAME=VALUE`` or the environment, ``${config_dir}`` is the YAML's folder)::

    name: medfmc_vit                 # names this sweep's files under RESULTS/sweeps/
    title: MedFMC, ViT-B/16 in21k
    protocol:                        # name: medfmc | vtab | fgvc | fewshot, plus that protocol's options
      name: medfmc
      root: data/MedFMC              # chest/, colon/, endo/ with images/ and the official .txt lists
      shots: [1, 5, 10]
      exps: [1, 2, 3, 4, 5]
      seeds: [0]                     # training seeds repeated per exp
    base:                            # RunConfig fields; the protocol fills in data, the sweep method/lr
      backbone: {name: vit_base_patch16_224.orig_in21k, pretrained: true}
      train: {optimizer: sgd, lr: 0.0006, epochs: 20, batch_size: 4}
    methods:                         # method names, preset names (PRESETS) or inline presets
      - linear
      - ept.dp                       # EPT, d_p in {5 .. 600} chosen on val
      - {preset: vpt.np, label: vpt}
      - {method: lora, options: {rank: 8}, train: {lr: 0.001}, label: lora-r8}
    grid:                            # TrainConfig fields searched for every method (train_grid overrides);
      lr: [0.01, 0.001]              # `grid: recipe` searches the protocol recipe's grid (VPT's lr x wd)
      weight_decay: [0.0, 0.0001]
    results: results/medfmc          # the results store (--results overrides)
    runner: {backend: inprocess}     # or {backend: process, workers: 2} / {backend: ray, ray_num_cpus: 4}
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from promptvit.errors import OutputError
from promptvit.io import atomic_write_text, output_folder, read_yaml_mapping
from promptvit.methods.base import ConfigError, available_methods
from promptvit.protocols.fewshot import FewShotProtocol
from promptvit.protocols.fgvc import FGVCProtocol
from promptvit.protocols.medfmc import MedFMCProtocol
from promptvit.protocols.runner import run_and_record
from promptvit.protocols.spec import Protocol, ProtocolError, RunSpec, Strict, Unit, config_hash
from promptvit.protocols.store import STORE_NAMES, ResultStore, load_records
from promptvit.protocols.vtab import VTABProtocol
from promptvit.recipes import RECIPES, get_recipe

Backend = Literal["inprocess", "process", "ray"]

# ------------------------------------------------------------------------------------------- presets


class MethodPreset(Strict):
    """A named method configuration with option grids (searched on val unless listed in ``report_over``)."""

    label: str | None = Field(None, description="table row name (default: the preset or method name)")
    preset: str | None = Field(None, description="start from this named preset, then apply the fields given")
    method: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="method option -> values; 'depth' = prompt the last k blocks"
    )
    train: dict[str, Any] = Field(default_factory=dict, description="fixed TrainConfig overrides")
    train_grid: dict[str, list[Any]] | None = Field(None, description="replaces the sweep's train grid")
    report_over: list[str] = Field(default_factory=list, description="grid keys kept as separate arms")
    depth_from: Literal["top", "bottom"] = "top"
    description: str = ""


# The papers' grids (EPT Sec. 4 and appendix; VPT; LoRA ranks and adapter reduction rates).
EPT_PROMPT_LENGTHS = [5, 10, 20, 50, 100, 200, 400, 600]
VPT_PROMPT_LENGTHS = [1, 5, 10, 50, 100, 150]
LOW_RANKS = [1, 4, 8, 32, 64]
# EPT appendix A.1.1: adapter "reduction rate r in [1, 4, 8, 32, 64]", i.e. bottleneck width d / r
ADAPTER_REDUCTIONS = [1, 4, 8, 32, 64]

PRESETS: dict[str, MethodPreset] = {
    "ept.dp": MethodPreset(
        method="ept",
        grid={"prompt_length": EPT_PROMPT_LENGTHS},
        description="EPT, prompt length d_p chosen on val (EPT paper grid)",
    ),
    "ept.dp_ablation": MethodPreset(
        method="ept",
        grid={"prompt_length": EPT_PROMPT_LENGTHS},
        report_over=["prompt_length"],
        description="EPT, one arm per d_p (accuracy vs prompt length)",
    ),
    "ept.depth": MethodPreset(
        method="ept",
        grid={"depth": [1, 2, 4, 6, 8, 12]},
        report_over=["depth"],
        description="EPT prompting the last k blocks, one arm per k (accuracy vs prompted depth)",
    ),
    "vpt.np": MethodPreset(
        method="vpt",
        grid={"prompt_length": VPT_PROMPT_LENGTHS},
        description="VPT-deep, prompt length n_p chosen on val (EPT/VPT grid)",
    ),
    "vpt.np_ablation": MethodPreset(
        method="vpt",
        grid={"prompt_length": VPT_PROMPT_LENGTHS},
        report_over=["prompt_length"],
        description="VPT-deep, one arm per n_p",
    ),
    "vpt.shallow": MethodPreset(method="vpt", options={"deep": False}, description="VPT-shallow"),
    "lora.rank": MethodPreset(
        method="lora", grid={"rank": LOW_RANKS}, description="LoRA (q, v), rank chosen on val"
    ),
    "adapter.rank": MethodPreset(
        method="adapter",
        grid={"reduction": ADAPTER_REDUCTIONS},
        description="bottleneck adapter, reduction rate r (width d / r) chosen on val (EPT App. A.1.1)",
    ),
    "vp.pad": MethodPreset(
        method="vp", options={"mode": "pad"}, description="VP pixel padding (CNN-capable)"
    ),
}


def resolve_preset(entry: str | MethodPreset) -> MethodPreset:
    """A preset name, a registered method name, or an inline preset (optionally extending a named one)."""
    if isinstance(entry, str):
        if entry in PRESETS:
            return PRESETS[entry].model_copy(update={"label": PRESETS[entry].label or entry})
        if entry in available_methods():
            return MethodPreset(label=entry, method=entry)
        raise ProtocolError(
            f"unknown method or preset '{entry}'; methods: {', '.join(available_methods())}; "
            f"presets: {', '.join(PRESETS)}"
        )
    if entry.preset is not None:
        if entry.preset not in PRESETS:
            raise ProtocolError(f"unknown preset '{entry.preset}'; presets: {', '.join(PRESETS)}")
        given = entry.model_dump(exclude_unset=True, exclude={"preset"})
        merged = PRESETS[entry.preset].model_copy(update=given)
        return merged.model_copy(update={"label": merged.label or entry.preset})
    if entry.method is None:
        raise ProtocolError("an inline method preset needs 'method' (or 'preset')")
    if entry.method not in available_methods():
        raise ProtocolError(f"unknown method '{entry.method}'; methods: {', '.join(available_methods())}")
    return entry.model_copy(update={"label": entry.label or entry.method})


def _layers_for_depth(k: int, depth: int, side: str) -> list[int]:
    return list(range(depth - k, depth)) if side == "top" else list(range(k))


def grid_points(
    preset: MethodPreset, train_grid: dict[str, list[Any]], backbone_depth: int | None = None
) -> list[dict[str, Any]]:
    """Cartesian product of the method and train grids as hparams dicts, in grid order."""
    axes: list[tuple[str, list[Any]]] = []
    for key, values in preset.grid.items():
        if not isinstance(values, list) or not values:
            raise ProtocolError(f"{preset.label}: grid '{key}' must be a non-empty list")
        if key == "depth":
            if backbone_depth is None:
                raise ProtocolError(f"{preset.label}: a 'depth' grid needs the backbone depth")
            kept = sorted({int(k) for k in values if 1 <= int(k) <= backbone_depth})
            if not kept:
                raise ProtocolError(
                    f"{preset.label}: no depth in {values} fits a {backbone_depth}-block backbone"
                )
            axes.append(
                ("method.layers", [_layers_for_depth(k, backbone_depth, preset.depth_from) for k in kept])
            )
        else:
            axes.append((f"method.{key}", values))
    grid = preset.train_grid if preset.train_grid is not None else train_grid
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ProtocolError(f"grid '{key}' must be a non-empty list")
        axes.append((f"train.{key}", values))
    if not axes:
        return [{}]
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))]


def _kept_keys(preset: MethodPreset) -> list[str]:
    return ["method.layers" if k == "depth" else f"method.{k}" for k in preset.report_over]


def _arm_of(point: dict[str, Any], kept: list[str]) -> str:
    return json.dumps({k: point.get(k) for k in kept}, sort_keys=True)


# ------------------------------------------------------------------------------------------ selection


@dataclass
class Choice:
    """The hyperparameters chosen on validation for one (task, shots, method arm)."""

    hparams: dict[str, Any]
    score: float
    runs: int
    candidates: int
    metric: str
    split: str
    detail: str


def _selection_key(record: dict[str, Any], kept: list[str]) -> tuple:
    return (
        record["protocol"],
        record["task"],
        record.get("shots"),
        record["method"],
        _arm_of(record["hparams"], kept),
    )


def select_hparams(
    records: Iterable[dict[str, Any]], report_over: dict[str, list[str]] | None = None
) -> dict[tuple, Choice]:
    """Best grid point per (protocol, task, shots, method, arm) by mean search-stage validation score.

    Only ``stage == 'search'`` records evaluated on ``val`` are considered, so test scores can never
    influence the choice. ``report_over`` maps a method label to the hparam keys kept as arms.
    """
    report_over = report_over or {}
    by_key: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    order: dict[tuple, list[str]] = defaultdict(list)
    for record in records:
        if record.get("stage") != "search" or record.get("evaluated_on", "val") != "val":
            continue
        key = _selection_key(record, report_over.get(record["method"], []))
        point = json.dumps(record["hparams"], sort_keys=True)
        if point not in by_key[key]:
            order[key].append(point)
        by_key[key][point].append(record)
    choices = {}
    for key, points in by_key.items():
        candidates = []
        for point in order[key]:
            runs = points[point]
            scores = [r.get("score") for r in runs]
            if any(r.get("status") != "ok" or s is None for r, s in zip(runs, scores, strict=True)):
                continue  # a diverged run disqualifies the point
            candidates.append((sum(scores) / len(scores), json.loads(point), runs))
        if not candidates:
            continue
        best = max(candidates, key=lambda c: (round(c[0], 9), -float(c[1].get("train.lr", 0.0))))
        mean, hparams, runs = best
        metric = runs[0].get("metric", "score")
        split = runs[0].get("split", "")
        choices[key] = Choice(
            hparams=hparams,
            score=mean,
            runs=len(runs),
            candidates=len(order[key]),
            metric=metric,
            split=split,
            detail=(
                f"val: best mean val {metric} {mean:.2f} over {len(runs)} search run(s) "
                f"({runs[0].get('selection', {}).get('epoch_split', 'val')} epoch), "
                f"{len(candidates)} of {len(order[key])} grid points valid"
            ),
        )
    return choices


# ---------------------------------------------------------------------------------------------- config

ProtocolConfig = Annotated[
    FewShotProtocol | MedFMCProtocol | VTABProtocol | FGVCProtocol, Field(discriminator="name")
]


class RunnerOptions(Strict):
    backend: Backend = "inprocess"
    workers: int = Field(2, ge=1, description="process backend: parallel worker processes")
    start_method: Literal["spawn", "forkserver", "fork"] = Field(
        "spawn", description="process backend: how workers start (fork is fastest, spawn the safest)"
    )
    threads: int | None = Field(None, ge=1, description="torch threads per run (default: 1 in workers)")
    ray_address: str | None = Field(None, description="existing Ray cluster (default: start a local one)")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance")
    cpus_per_run: float = Field(1, gt=0, description="Ray: CPUs reserved per run")
    gpus_per_run: float = Field(0, ge=0, description="Ray: GPUs reserved per run")


def _recipes_with_grid() -> list[str]:
    return sorted(name for name, recipe in RECIPES.items() if recipe.protocol_value("grid"))


class SweepConfig(Strict):
    """A sweep YAML: protocol + base run config + methods + grids (+ where results go and how to run)."""

    name: str = Field("sweep", description="names this sweep's files in the results folder")
    title: str | None = None
    protocol: ProtocolConfig
    base: dict[str, Any] = Field(description="RunConfig fields (backbone, train, data options, method)")
    methods: list[str | MethodPreset] = Field(default_factory=lambda: ["linear"])
    grid: dict[str, list[Any]] | Literal["recipe"] = Field(
        default_factory=dict,
        description="TrainConfig field -> values, or 'recipe': the protocol recipe's lr/wd grid (VPT's)",
    )
    results: str | None = None
    runner: RunnerOptions = Field(default_factory=RunnerOptions)

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
            raise ValueError("name may only contain letters, digits, '.', '_' and '-'")
        return value

    @field_validator("methods")
    @classmethod
    def _some_methods(cls, value: list[str | MethodPreset]) -> list[str | MethodPreset]:
        if not value:
            raise ValueError("methods is empty: list at least one method or preset to run")
        return value

    @model_validator(mode="after")
    def _recipe_grid(self) -> SweepConfig:
        """``grid: recipe`` becomes the grid the protocol's recipe states (its ``train.`` keys unprefixed)."""
        if self.grid != "recipe":
            return self
        recipe = self.protocol.recipe
        grid = get_recipe(recipe).protocol_value("grid") if recipe else None
        if not grid:
            raise ValueError(
                f"grid: recipe needs a protocol recipe that states a grid; the protocol's recipe is {recipe!r} "
                f"(recipes with one: {', '.join(_recipes_with_grid())}); give the grid as field -> values instead"
            )
        self.grid = {key.removeprefix("train."): list(values) for key, values in grid.items()}
        return self

    @field_validator("base")
    @classmethod
    def _has_backbone(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "backbone" not in value:
            raise ValueError("base needs a backbone section (name, weights/pretrained, options)")
        return value


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _substitute(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in variables:
                return variables[name]
            if name in os.environ:
                return os.environ[name]
            raise ProtocolError(
                f"unknown variable ${{{name}}} in the sweep config (set it in the environment)"
            )

        return _VAR.sub(replace, value)
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    return value


def load_sweep_config(path: str | Path, variables: dict[str, str] | None = None) -> SweepConfig:
    """Read a sweep YAML; ``${NAME}`` in strings is replaced from ``variables``, then the environment."""
    path = Path(path)
    raw = read_yaml_mapping(
        path, name="sweep config", holds="protocol, base, methods, grid, ...", error=ProtocolError
    )
    raw = _substitute(raw, {"config_dir": str(path.parent.absolute()), **(variables or {})})
    return SweepConfig.model_validate(raw)


# -------------------------------------------------------------------------------------------- backends

Event = Callable[[str, RunSpec, str, str | None, int, int], None]


def _worker(spec_json: str, store_root: str, threads: int | None) -> tuple[str, str, str | None]:
    """Run one spec in a worker (process pool or Ray); returns (config hash, status, error)."""
    spec = RunSpec.model_validate_json(spec_json)
    store = ResultStore(store_root)
    status = run_and_record(spec, store, threads=threads)
    return config_hash(spec), status, _last_error(store, spec) if status == "failed" else None


def _last_error(store: ResultStore, spec: RunSpec) -> str | None:
    digest = config_hash(spec)
    attempts = sorted(store.failed_dir.glob(f"{digest}.*.json"))
    if not attempts:
        return None
    try:
        return json.loads(attempts[-1].read_text(encoding="utf-8")).get("error")
    except (OSError, json.JSONDecodeError):
        return None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ProtocolError(
            "backend 'ray' needs Ray: pip install 'promptvit[ray]' (or pip install ray); "
            "or use --backend inprocess / process"
        ) from error
    return ray


def run_specs(
    specs: list[RunSpec],
    store: ResultStore,
    runner: RunnerOptions | None = None,
    on_event: Event | None = None,
    stage: str = "",
) -> Counter:
    """Run every spec not yet recorded; returns a Counter of statuses (skipped, ok, diverged, failed...)."""
    runner = runner or RunnerOptions()
    unique: dict[str, RunSpec] = {}
    for spec in specs:
        unique.setdefault(config_hash(spec), spec)
    counts: Counter = Counter()
    pending = []
    for digest, spec in unique.items():
        if store.has(digest):
            counts["skipped"] += 1
        else:
            pending.append((digest, spec))
    total = len(pending)
    if not pending:
        return counts
    store.ensure()

    def report(spec: RunSpec, status: str, error: str | None, done: int) -> None:
        counts[status] += 1
        if on_event is not None:
            on_event(stage, spec, status, error, done, total)

    if runner.backend == "inprocess":
        # first pass: runs another process is training right now are deferred, not waited for, so several
        # sweep processes on one store share the work; second pass: wait for those, then skip or run them
        busy = []
        done = 0
        for _, spec in pending:
            status = run_and_record(spec, store, threads=runner.threads, wait=False)
            if status == "busy":
                busy.append(spec)
                continue
            done += 1
            report(spec, status, _last_error(store, spec) if status == "failed" else None, done)
        for spec in busy:
            done += 1
            status = run_and_record(spec, store, threads=runner.threads)
            report(spec, status, _last_error(store, spec) if status == "failed" else None, done)
    elif runner.backend == "process":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = runner.threads or 1
        with ProcessPoolExecutor(
            runner.workers, mp_context=multiprocessing.get_context(runner.start_method)
        ) as pool:
            futures = {
                pool.submit(_worker, spec.model_dump_json(), str(store.root), threads): spec
                for _, spec in pending
            }
            for done, future in enumerate(as_completed(futures), start=1):
                try:
                    _, status, error = future.result()
                except OutputError:  # the results disk, not the run: stop the sweep
                    raise
                except Exception as crash:  # noqa: BLE001 - a worker died (e.g. out of memory): not recorded
                    status, error = "failed", f"worker process failed: {crash!r}"
                report(futures[future], status, error, done)
    elif runner.backend == "ray":
        ray = _import_ray()
        started = False
        if not ray.is_initialized():
            ray.init(
                address=runner.ray_address,
                num_cpus=runner.ray_num_cpus if runner.ray_address is None else None,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
            )
            started = True
        try:
            remote = ray.remote(num_cpus=runner.cpus_per_run, num_gpus=runner.gpus_per_run)(_worker)
            threads = runner.threads or max(1, int(runner.cpus_per_run))
            refs = {
                remote.remote(spec.model_dump_json(), str(store.root.absolute()), threads): spec
                for _, spec in pending
            }
            remaining = list(refs)
            done = 0
            while remaining:
                ready, remaining = ray.wait(remaining, num_returns=1)
                for ref in ready:
                    done += 1
                    try:
                        _, status, error = ray.get(ref)
                    except Exception as error:  # noqa: BLE001 - a worker crash: nothing was recorded
                        status, error = "failed", f"Ray task failed: {error}"
                    report(refs[ref], status, error, done)
        finally:
            if started:
                ray.shutdown()
    else:  # pragma: no cover - validated by RunnerOptions
        raise ProtocolError(f"unknown backend {runner.backend}")
    return counts


# ----------------------------------------------------------------------------------------------- sweep


@dataclass
class SweepResult:
    """What a sweep did: planned runs per stage, statuses, the choices and what could not be run."""

    results: Path
    planned: dict[str, int] = field(default_factory=dict)
    counts: dict[str, Counter] = field(default_factory=dict)
    choices: dict[tuple, Choice] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _data_roots(protocol: Any) -> list[str]:
    """The data folders and files a protocol reads (no results may be written inside them)."""
    tasks = getattr(protocol, "tasks", None)
    tasks = tasks.values() if isinstance(tasks, dict) else []
    paths = [getattr(protocol, "root", None)]
    paths += [data.get(key) for data in tasks if isinstance(data, dict) for key in ("path", "image_root")]
    return [p for p in paths if isinstance(p, str) and Path(p).exists()]


def _backbone_depth(base: dict[str, Any]) -> int:
    from promptvit.backbones import create_backbone, geometry_of

    spec = base["backbone"]
    return geometry_of(create_backbone(spec["name"], pretrained=False, **spec.get("options", {}))).depth


def plan_search(config: SweepConfig, presets: list[MethodPreset], depth: int | None) -> list[RunSpec]:
    specs: list[RunSpec] = []
    for preset in presets:
        points = grid_points(preset, config.grid, depth)
        kept = _kept_keys(preset)
        arms: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for point in points:
            arms[_arm_of(point, kept)].append(point)
        for arm_points in arms.values():
            if len(arm_points) < 2:
                continue
            for point in arm_points:
                specs += _specs_for(config, preset, "search", point, None)
    return specs


def _base_with_train(config: SweepConfig, preset: MethodPreset) -> dict[str, Any]:
    base = dict(config.base)
    base["train"] = {**base.get("train", {}), **preset.train}
    return base


def _specs_for(
    config: SweepConfig,
    preset: MethodPreset,
    stage: str,
    point: dict[str, Any],
    notes: dict[str, Any] | None,
    units: list[Unit] | None = None,
) -> list[RunSpec]:
    kept = _kept_keys(preset)
    arm = {k.split(".", 1)[1]: point.get(k) for k in kept}
    labels = [resolve_preset(m).label for m in config.methods]
    notes = {
        **(notes or {}),
        "method_rank": labels.index(preset.label) if preset.label in labels else len(labels),
    }
    try:
        return config.protocol.run_specs(
            _base_with_train(config, preset),
            stage=stage,  # type: ignore[arg-type]
            method=preset.method,
            label=preset.label,
            method_options=preset.options,
            hparams=point,
            notes=notes,
            units=units,
            tags={"arm": arm} if arm else None,
        )
    except ConfigError as error:
        raise ProtocolError(f"method preset '{preset.label}': {error}") from error


def plan_final(
    config: SweepConfig,
    presets: list[MethodPreset],
    depth: int | None,
    choices: dict[tuple, Choice],
    unresolved: list[str] | None = None,
) -> list[RunSpec]:
    protocol: Protocol = config.protocol
    units = protocol.units("final")
    specs: list[RunSpec] = []
    for preset in presets:
        points = grid_points(preset, config.grid, depth)
        kept = _kept_keys(preset)
        arms: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for point in points:
            arms[_arm_of(point, kept)].append(point)
        for arm, arm_points in arms.items():
            if len(arm_points) == 1:
                notes = {
                    "hyperparameters": "fixed (one grid point, no search)",
                    "hyperparameters_split": "none (fixed)",
                }
                specs += _specs_for(config, preset, "final", arm_points[0], notes, units)
                continue
            for unit in units:
                key = (protocol.kind, unit.task, unit.shots, preset.label, arm)
                choice = choices.get(key)
                if choice is None:
                    if unresolved is not None:
                        unresolved.append(
                            f"{preset.label} {unit.task} K={unit.shots}{' ' + arm if kept else ''}: no usable "
                            "search result (failed, diverged or incomplete); its final runs were skipped"
                        )
                    continue
                notes = {
                    "hyperparameters": choice.detail,
                    "hyperparameters_split": "val",
                    "choice_score": choice.score,
                }
                specs += _specs_for(config, preset, "final", choice.hparams, notes, [unit])
    return specs


def run_sweep(
    config: SweepConfig,
    *,
    results: str | Path | None = None,
    backend: Backend | None = None,
    workers: int | None = None,
    dry_run: bool = False,
    on_event: Event | None = None,
) -> SweepResult:
    """Run ``config``'s search stage, choose on validation, run the final stage; all resumable."""
    given = {k: v for k, v in {"backend": backend, "workers": workers}.items() if v is not None}
    runner = RunnerOptions.model_validate({**config.runner.model_dump(), **given})  # --workers 0 is refused
    root = Path(results or config.results or "results")
    # the results folder is new, empty or a store promptvit made; a dry run only checks it
    inputs = _data_roots(config.protocol)
    output_folder(root, "results", inputs=inputs, legacy=STORE_NAMES, create=not dry_run)
    store = ResultStore(root)
    presets = [resolve_preset(m) for m in config.methods]
    labels = [p.label for p in presets]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ProtocolError(f"method labels must be unique; repeated: {duplicated} (set 'label' on presets)")
    config.protocol.check()
    depth = _backbone_depth(config.base) if any("depth" in p.grid for p in presets) else None
    outcome = SweepResult(results=root)
    search = plan_search(config, presets, depth)
    outcome.planned["search"] = len({config_hash(s) for s in search})
    if not dry_run:
        atomic_write_text(
            root / "sweeps" / f"{config.name}.yaml",
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
        )
        outcome.counts["search"] = run_specs(search, store, runner, on_event, "search")
    search_hashes = {config_hash(s) for s in search}
    loaded = load_records(root) if store.records_dir.is_dir() else None
    records = [r for r in loaded.records if r["config_hash"] in search_hashes] if loaded else []
    report_over = {p.label: _kept_keys(p) for p in presets}
    outcome.choices = select_hparams(records, report_over)
    # a (task, K, method arm) whose search has failed runs waits for them: rerunning the sweep retries them
    failed_search = [f for f in (loaded.failures if loaded else []) if f.get("config_hash") in search_hashes]
    for failure in failed_search:
        key = _selection_key(failure, report_over.get(failure["method"], []))
        if outcome.choices.pop(key, None) is not None and not dry_run:
            outcome.unresolved.append(
                f"{failure['method']} {failure['task']} K={failure.get('shots')}: the search has failed runs; "
                "its final runs wait until a rerun of the sweep completes the search"
            )
    final = plan_final(config, presets, depth, outcome.choices, outcome.unresolved if not dry_run else None)
    outcome.unresolved = list(dict.fromkeys(outcome.unresolved))
    outcome.planned["final"] = len({config_hash(s) for s in final})
    if dry_run:
        return outcome
    atomic_write_text(
        root / "sweeps" / f"{config.name}.selections.json",
        json.dumps(
            [
                {
                    "protocol": k[0],
                    "task": k[1],
                    "shots": k[2],
                    "method": k[3],
                    "arm": json.loads(k[4]),
                    "hparams": c.hparams,
                    "val_score": c.score,
                    "metric": c.metric,
                    "detail": c.detail,
                }
                for k, c in sorted(outcome.choices.items(), key=lambda kv: json.dumps(kv[0], default=str))
            ],
            indent=1,
        )
        + "\n",
    )
    outcome.counts["final"] = run_specs(final, store, runner, on_event, "final")
    mine = search_hashes | {config_hash(s) for s in final}
    outcome.failures = [
        f"{f.get('stage')} {f.get('method')} {f.get('task')} K={f.get('shots')} {f.get('split')} "
        f"seed {f.get('seed')}: {f.get('error')}"
        for f in load_records(root).failures
        if f.get("config_hash") in mine
    ]
    return outcome
