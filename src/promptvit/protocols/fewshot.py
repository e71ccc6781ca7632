"""The generic few-shot suite for any labelled folder, CSV or MedMNIST-style ``.npz`` data set.

Per task, K in ``shots`` and per draw seed: a seeded stratified test split (a fraction, or
``test_per_class`` images per class), K training images per class from the rest, validation from what is
left (at most ``val_per_class`` per class). ``.npz`` files keep their official train/val/test splits: K per
class are drawn from train, validation is the official val (capped at ``val_per_class`` per class when
``val_cap`` is on), test the official test. The draw seed is also the training seed.

A task of ``kind: fewshot`` is a folder written by ``promptvit data fewshot`` (either format): its own
draws are used as written, per K in ``shots`` every exp of the folder (the search stage: the first), each
trained with the seed it was drawn with.

Hyperparameters are chosen on validation (search stage, ``search_seeds`` draws) and the epoch on
validation; the test split is evaluated once per final run.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from promptvit.protocols.spec import Protocol, ProtocolError, Stage, Unit, absolute

DEFAULT_SHOTS = (1, 5, 10, 20)
_TASK_OVERRIDES = ("test_fraction", "test_per_class", "val_per_class")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)


class FewShotProtocol(Protocol):
    """``tasks``: name -> data options (``kind`` folder/csv/npz, ``path``, CSV columns, ``classes``...).

    A task may override ``test_fraction``, ``test_per_class`` and ``val_per_class`` for itself.
    """

    kind: ClassVar[str] = "fewshot"
    name: Literal["fewshot"] = "fewshot"
    tasks: dict[str, dict[str, Any]]
    shots: list[int] = Field(default_factory=lambda: list(DEFAULT_SHOTS))
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS))
    search_seeds: list[int] | None = Field(
        None, description="draws used for the search (default: first seed)"
    )
    test_fraction: float | None = Field(0.3, gt=0, lt=1)
    test_per_class: int | None = Field(None, ge=1, description="instead of test_fraction (single-label)")
    val_per_class: int | None = Field(20, ge=1)
    metric: str = Field("auto", description="primary metric: auto = map (multi-label) or accuracy")
    augment: bool = Field(True, description="random resized crops (and flips) for training")
    eval_resize: Literal["model", "direct"] = Field(
        "model", description="evaluation resize: the model's crop_pct recipe, or straight to the input size"
    )

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not tasks:
            raise ValueError("give at least one task: {name: {kind: folder|csv|npz, path: ...}}")
        for name, data in tasks.items():
            if not isinstance(data, dict) or "path" not in data:
                raise ValueError(f"task '{name}' needs a data mapping with at least 'path'")
            if data.get("kind", "folder") not in ("folder", "csv", "npz", "fewshot"):
                raise ValueError(f"task '{name}': kind must be folder, csv, npz or fewshot")
        return tasks

    def _option(self, task: str, key: str) -> Any:
        return self.tasks[task].get(key, getattr(self, key))

    def _data(self, task: str, shots: int) -> dict[str, Any]:
        data = {k: v for k, v in self.tasks[task].items() if k not in _TASK_OVERRIDES}
        data.setdefault("kind", "folder")
        data["path"] = absolute(data["path"])
        if data.get("image_root"):
            data["image_root"] = absolute(data["image_root"])
        data["shots"] = shots
        if data["kind"] != "npz":
            data["test_fraction"] = self._option(task, "test_fraction")
            data["val_per_class"] = self._option(task, "val_per_class")
        return data

    def units(self, stage: Stage) -> list[Unit]:
        seeds = self.seeds if stage == "final" else (self.search_seeds or self.seeds[:1])
        units = []
        for task, raw in self.tasks.items():
            if raw.get("kind") == "fewshot":
                units += self._written_draws(task, stage)
                continue
            npz = raw.get("kind", "folder") == "npz"
            for shots in self.shots:
                for seed in seeds:
                    units.append(
                        Unit(
                            task=task,
                            shots=shots,
                            split=f"draw {seed}",
                            seed=seed,
                            split_seed=seed,
                            data=self._data(task, shots),
                            evaluate_on="val" if stage == "search" else "test",
                            epoch_selection="val",
                            metric=self.metric,
                            augment=self.augment,
                            eval_resize=self.eval_resize,
                            test_per_class=None if npz else self._option(task, "test_per_class"),
                            val_cap=self._option(task, "val_per_class") if npz else None,
                            tags={"dataset_kind": raw.get("kind", "folder")},
                        )
                    )
        return units

    def _written_draws(self, task: str, stage: Stage) -> list[Unit]:
        """A `data fewshot` folder's own draws: per K, every exp (search: the first), trained with its seed."""
        from promptvit.data import DataError
        from promptvit.data.split_files import read_fewshot_folder

        try:
            folder, _ = read_fewshot_folder(self.tasks[task]["path"])
        except DataError as error:
            raise ProtocolError(f"fewshot task '{task}': {error}") from None
        exps = range(1, len(folder.seeds) + 1) if stage == "final" else [1]
        data = {k: v for k, v in self.tasks[task].items() if k not in _TASK_OVERRIDES}
        return [
            Unit(
                task=task,
                shots=shots,
                split=f"exp{exp}",
                seed=folder.seeds[exp - 1],
                data={**data, "path": absolute(data["path"]), "shots": shots, "exp": exp},
                evaluate_on="val" if stage == "search" else "test",
                epoch_selection="val",
                metric=self.metric,
                augment=self.augment,
                eval_resize=self.eval_resize,
                tags={"dataset_kind": "fewshot", "draw_seed": folder.seeds[exp - 1]},
            )
            for shots in self.shots
            for exp in exps
        ]

    def check(self) -> None:
        """Read every task's labels once (not the images), so a bad path or column fails before any run."""
        from promptvit.data import DataError, read_npz
        from promptvit.data.spec import DataSpec, load_samples

        for task in self.tasks:
            data = self._data(task, self.shots[0] if self.shots else 1)
            try:
                if data["kind"] == "npz":
                    read_npz(data["path"], "train")
                elif data["kind"] == "fewshot":
                    from promptvit.data.split_files import read_fewshot_folder

                    folder, _ = read_fewshot_folder(data["path"])
                    for shots in self.shots:
                        folder.draw_files(shots, 1)
                else:
                    load_samples(DataSpec.model_validate(data))
            except (DataError, ValueError) as error:
                raise ProtocolError(f"fewshot task '{task}': {error}") from None
