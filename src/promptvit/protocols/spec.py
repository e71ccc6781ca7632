"""Run specs: what one run of a benchmark protocol is, and the stable hashes that identify it.

A protocol (MedFMC, VTAB-1k, FGVC, the generic few-shot suite) turns a base config into *units* (task,
shots, split, seed, which data trains and which evaluates); a sweep crosses units with method presets and
hyperparameter grid points into :class:`RunSpec` objects. A spec is plain, validated, JSON-serialisable
data, so it can be hashed, shipped to a Ray worker or another process, and recorded with its result.

Two hashes (see :func:`config_hash` and :func:`train_hash`):

* ``config_hash`` identifies a *run record*: everything that can change the recorded result (the resolved
  ``RunConfig`` minus operational fields such as the device or progress bars, the split, what is evaluated,
  the stage). The results store keeps exactly one record per config hash.
* ``train_hash`` identifies the *training* only (the evaluated set left out). A search-stage run and a final
  run that train the same model on the same data share a run folder, so the final run resumes the finished
  training and only evaluates the test set.

Both leave out config fields at their default, so that a new option (at a default that keeps the old
behaviour) leaves the hashes of existing records valid. A default that changes meaning would make old records
pass for the new behaviour; a method's config therefore names such options in ``identity_options``, and both
hashes always hold their resolved values (a run that leaves them unset gets a new identity and runs again).
"""

from __future__ import annotations

import copy
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from promptvit.errors import ProtocolError
from promptvit.methods.base import ConfigError, make_config
from promptvit.recipes import apply_recipe, get_recipe
from promptvit.run_config import RunConfig
from promptvit.train.config import OPERATIONAL_FIELDS

#: DataSpec keys that describe training-time preprocessing; kept from the base config for every protocol
TRANSFORM_KEYS = ("train_scale", "hflip", "skip_corrupt", "allow_duplicates")

Stage = Literal["search", "final"]
EvalSplit = Literal["val", "test"]
EpochSelection = Literal["val", "last"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN/inf in no float option


class SourceSpec(Strict):
    """One labelled image source of a fixed split: a ``<class>/<image>`` folder, a ``file,label`` CSV, a
    ``relative/path label`` list (VTAB-1k's ``train800.txt``...) or a ``{path: class_id}`` JSON (VPT's FGVC)."""

    kind: Literal["folder", "csv", "list", "json"] = "folder"
    path: str
    image_root: str | None = Field(
        None, description="CSV, list, JSON: folder the file names are relative to (default: the file's folder)"
    )
    file_column: str = "file"
    label_column: str = "label"
    file_suffix: str = ""
    group_column: str | None = Field(
        None, description="CSV: patient/lesion/study column; a hold-out keeps each group on one side"
    )


class SplitSpec(Strict):
    """Fixed train/val/test sources (VTAB folders, FGVC train/test) used instead of ``make_split``.

    Class names are the union over ``class_sources`` and every listed source, naturally sorted, so a split
    that lacks a class (VTAB's train800 of a 397-class task) keeps the same label indices and head size.
    """

    train: SourceSpec
    val: SourceSpec | None = None
    test: SourceSpec | None = None
    holdout_fraction: float | None = Field(
        None, gt=0, lt=1, description="carve val from train: this fraction per class, stratified, seeded"
    )
    holdout_seed: int = 0
    class_sources: list[SourceSpec] = Field(default_factory=list)
    more_train: list[SourceSpec] = Field(
        default_factory=list, description="further sources appended to train (FGVC final: train.json + val.json)"
    )


class RunSpec(Strict):
    """One run: a resolved ``RunConfig`` plus where it sits in its protocol (the tags of its record)."""

    protocol: str
    task: str
    shots: int | None = None
    split: str = Field(description="human label of the split, e.g. 'exp3', 'draw 2', 'train800 -> val200'")
    seed: int = Field(description="training seed (= config.train.seed)")
    split_seed: int | None = Field(None, description="seed of the data draw; None when the split is fixed")
    stage: Stage = "final"
    method: str = Field(description="method preset label (the table row)")
    hparams: dict[str, Any] = Field(
        default_factory=dict, description="the grid point, keys 'train.<field>' and 'method.<option>'"
    )
    config: RunConfig
    splits: SplitSpec | None = Field(None, description="fixed sources; None = make_split(config.data)")
    evaluate_on: EvalSplit = "test"
    epoch_selection: EpochSelection = "val"
    metric: str = Field("auto", description="primary metric; 'auto' = map (multi-label) or accuracy")
    augment: bool = True
    eval_resize: Literal["model", "direct"] = "model"
    interpolation: str | None = None
    test_per_class: int | None = None
    val_cap: int | None = Field(None, ge=1, description="keep at most this many val images per class")
    group: str | None = None
    tags: dict[str, Any] = Field(default_factory=dict)
    notes: dict[str, Any] = Field(default_factory=dict, description="not hashed: how hparams were chosen")

    def describe(self) -> str:
        shots = f" K={self.shots}" if self.shots else ""
        hp = " ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in sorted(self.hparams.items()))
        return f"{self.stage} {self.method} {self.task}{shots} {self.split} seed {self.seed}" + (
            f" [{hp}]" if hp else ""
        )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def _digest(value: Any) -> str:
    return hashlib.sha256(_canonical(value).encode("utf-8")).hexdigest()


def _without_defaults(model: BaseModel) -> dict[str, Any]:
    """JSON dump of ``model`` leaving out fields equal to their declared default (sub-models recursed)."""
    dumped = model.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out[name] = _without_defaults(value)
            continue
        if info.default_factory is None and not info.is_required() and value == info.default:
            continue
        if info.default_factory is not None:
            try:
                if value == info.default_factory():  # type: ignore[call-arg]
                    continue
            except Exception:  # noqa: BLE001 - a factory that cannot run alone (e.g. needs a path)
                pass
        out[name] = dumped[name]
    return out


def _config_part(spec: RunSpec) -> dict[str, Any]:
    """The run config without operational fields and without fields at their default value.

    Leaving defaults out keeps the hashes of existing records valid when promptvit gains a new option (at
    a default that keeps the old behaviour); the record still stores the full config for auditing. The
    method's ``identity_options`` (defaults that changed meaning) are always in, at their resolved values.
    """
    config = _without_defaults(spec.config)
    _, method_config = make_config(spec.config.method.name, **spec.config.method.options)
    pinned = {name: getattr(method_config, name) for name in method_config.identity_options}
    if pinned:
        method = config.setdefault("method", {})
        method["options"] = {**pinned, **method.get("options", {})}
    if not config.get("evaluation"):  # a section added after records existed: at its defaults, no hash change
        config.pop("evaluation", None)
    config.pop("output_dir", None)
    config.pop("name", None)
    for key in OPERATIONAL_FIELDS:
        config.get("train", {}).pop(key, None)
    return config


def resolved_config(spec: RunSpec) -> dict[str, Any]:
    """What :func:`config_hash` hashes: the spec minus ``notes``, operational and default-valued config
    fields (the full config is ``spec.config``)."""
    data = _without_defaults(spec)
    data.pop("notes", None)
    data["config"] = _config_part(spec)
    return data


def config_hash(spec: RunSpec) -> str:
    """Stable SHA-256 (hex) of :func:`resolved_config`: the identity of a run record."""
    return _digest(resolved_config(spec))


def train_hash(spec: RunSpec) -> str:
    """Stable SHA-256 of what determines training: config, training data, epoch selection, preprocessing."""
    splits = None
    if spec.splits is not None:
        splits = spec.splits.model_dump(mode="json", exclude={"test"})
        if not splits["more_train"]:
            del splits["more_train"]  # keeps the hashes of runs recorded before the field existed
        # the test source still names classes (head size), so it stays as a class source
        if spec.splits.test is not None:
            splits["class_sources"] = [*splits["class_sources"], spec.splits.test.model_dump(mode="json")]
    return _digest(
        {
            "config": _config_part(spec),
            "splits": splits,
            "split_seed": spec.split_seed,
            "test_per_class": spec.test_per_class,
            "epoch_selection": spec.epoch_selection,
            "augment": spec.augment,
            "eval_resize": spec.eval_resize,
            "interpolation": spec.interpolation,
            "val_cap": spec.val_cap,
        }
    )


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``override`` wins); neither input is modified."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def absolute(path: str | Path) -> str:
    """Absolute, user-expanded path as a string (hashes must not depend on the working directory)."""
    return str(Path(path).expanduser().absolute())


@dataclass
class Unit:
    """One protocol slot (task, shots, split, seed) before a method and hyperparameters are chosen."""

    task: str
    split: str
    seed: int
    evaluate_on: EvalSplit
    epoch_selection: EpochSelection
    shots: int | None = None
    split_seed: int | None = None
    data: dict[str, Any] | None = None  # DataSpec fields (make_split units)
    splits: SplitSpec | None = None  # fixed sources (VTAB, FGVC)
    metric: str = "auto"
    augment: bool = True
    eval_resize: Literal["model", "direct"] = "model"
    interpolation: str | None = None
    test_per_class: int | None = None
    val_cap: int | None = None
    group: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)


class Protocol(Strict, ABC):
    """Base of the protocol definitions: they list units; :meth:`run_specs` makes them runnable."""

    kind: ClassVar[str] = ""
    #: how the report orders tasks (None: order of appearance)
    task_order: ClassVar[tuple[str, ...] | None] = None
    #: the paper recipe (promptvit.recipes) whose values fill what the base config leaves unset; a protocol
    #: sets its matching one as the default, ``recipe: null`` turns it off
    recipe: str | None = None

    def recipe_value(self, key: str, default: Any = None) -> Any:
        """A protocol entry of the recipe (seeds, eval_resize, select_metric...), or ``default`` without one."""
        if self.recipe is None:
            return default
        try:
            return get_recipe(self.recipe).protocol_value(key, default)
        except ConfigError as error:
            raise ProtocolError(f"{self.kind}: {error}") from None

    @abstractmethod
    def units(self, stage: Stage) -> list[Unit]:
        """Search-stage units train -> val; final-stage units train -> test."""

    def check(self) -> None:
        """Raise ProtocolError early when the data the protocol needs is missing."""

    def run_specs(
        self,
        base: dict[str, Any] | RunConfig,
        *,
        stage: Stage = "final",
        method: str | None = None,
        label: str | None = None,
        method_options: dict[str, Any] | None = None,
        hparams: dict[str, Any] | None = None,
        notes: dict[str, Any] | None = None,
        units: list[Unit] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> list[RunSpec]:
        """One :class:`RunSpec` per unit of ``stage``, from ``base`` (a RunConfig or its dict, data optional).

        ``method`` (default: the base config's method) with ``method_options``; ``hparams`` is a grid point
        (``{'train.lr': 0.01, 'method.prompt_length': 10}``) applied on top; ``label`` names the table row;
        ``tags`` are added to every spec's tags.
        """
        if isinstance(base, RunConfig):  # with a recipe, only what the config set explicitly beats it
            raw = base.model_dump(mode="json", exclude_unset=self.recipe is not None)
        else:
            raw = copy.deepcopy(base or {})
        hparams = dict(hparams or {})
        base_method = raw.get("method") or {}
        name = method or base_method.get("name", "linear")
        if self.recipe is not None:
            try:
                raw = apply_recipe(raw, self.recipe, method=name)
            except ConfigError as error:
                raise ProtocolError(f"{self.kind}: {error}") from None
        options = dict(base_method.get("options", {})) if method is None else {}
        options.update(method_options or {})
        if self.recipe is not None:  # beneath the preset's and the base config's options
            options = {**get_recipe(self.recipe).options_for(name), **options}
        train_hp: dict[str, Any] = {}
        for key, value in hparams.items():
            section, _, option = key.partition(".")
            if section == "method" and option:
                options[option] = value
            elif section == "train" and option:
                train_hp[option] = value
            else:
                raise ProtocolError(f"hyperparameter '{key}' must be 'train.<field>' or 'method.<option>'")
        specs = []
        task_rank = {t: i for i, t in enumerate(dict.fromkeys(u.task for u in self.units("final")))}
        for unit in self.units(stage) if units is None else units:
            run = deep_merge(raw, unit.config_overrides)
            base_data = raw.get("data") or {}
            if unit.data is not None:
                run["data"] = {**base_data, **unit.data}
            elif unit.splits is not None:
                train = unit.splits.train
                run["data"] = {
                    "kind": train.kind,
                    "path": train.path,
                    **({"image_root": train.image_root} if train.image_root else {}),
                    **{k: base_data[k] for k in TRANSFORM_KEYS if k in base_data},
                }
            # The recorded config states the augmentation the run uses: the unit's (VTAB: none) and the base's.
            augment = unit.augment and bool(base_data.get("augment", True))
            if not augment:
                run.setdefault("data", {})["augment"] = False
            run["method"] = {"name": name, "options": options}
            run["train"] = {**run.get("train", {}), **train_hp, "seed": unit.seed}
            run.setdefault("train", {}).setdefault("progress", False)
            try:
                config = RunConfig.model_validate(run)
            except ValueError as error:
                raise ProtocolError(f"{self.kind} {unit.task}: invalid run config: {error}") from error
            specs.append(
                RunSpec(
                    protocol=self.kind,
                    task=unit.task,
                    shots=unit.shots,
                    split=unit.split,
                    seed=unit.seed,
                    split_seed=unit.split_seed,
                    stage=stage,
                    method=label or name,
                    hparams=hparams,
                    config=config,
                    splits=unit.splits,
                    evaluate_on=unit.evaluate_on,
                    epoch_selection=unit.epoch_selection,
                    metric=unit.metric,
                    augment=augment,
                    eval_resize=unit.eval_resize,
                    interpolation=unit.interpolation,
                    test_per_class=unit.test_per_class,
                    val_cap=unit.val_cap,
                    group=unit.group,
                    tags={**unit.tags, **(tags or {})},
                    notes={**(notes or {}), "task_rank": task_rank.get(unit.task, len(task_rank))},
                )
            )
        return specs
