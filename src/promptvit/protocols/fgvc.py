"""FGVC (CUB-200, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars): tune on a 90/10 hold-out, report test.

Layout, per data set (``layout: folder``, the default)::

    <root>/<dataset>/train/<class>/*.jpg
    <root>/<dataset>/test/<class>/*.jpg

or ``layout: csv``: ``<root>/<dataset>/train.csv`` and ``test.csv`` with columns ``file,label`` (file names
relative to the CSV's folder). ``<dataset>`` is one of :data:`FGVC_DATASETS` (``cub``, ``nabirds``,
``flowers``, ``dogs``, ``cars``).

Validation is 10 % of the training set per class (stratified, seeded by the run's seed, disjoint by
file); hyperparameters and the epoch are chosen on it; the official test set is evaluated once per final
run. (VPT ships fixed split JSONs; this protocol draws the 90/10 split itself.)
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from promptvit.protocols.spec import Protocol, ProtocolError, SourceSpec, SplitSpec, Stage, Unit, absolute

FGVC_DATASETS: dict[str, int] = {"cub": 200, "nabirds": 555, "flowers": 102, "dogs": 120, "cars": 196}


class FGVCProtocol(Protocol):
    kind: ClassVar[str] = "fgvc"
    task_order: ClassVar[tuple[str, ...]] = tuple(FGVC_DATASETS)
    name: Literal["fgvc"] = "fgvc"
    recipe: str | None = "vpt-fgvc"
    root: str
    datasets: list[str] = Field(default_factory=lambda: list(FGVC_DATASETS))
    layout: Literal["folder", "csv"] = "folder"
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    search_seeds: list[int] | None = Field(None, description="default: the first seed")
    check_num_classes: bool = Field(True, description="require the canonical class count of each data set")

    @field_validator("datasets")
    @classmethod
    def _known(cls, datasets: list[str]) -> list[str]:
        unknown = [d for d in datasets if d not in FGVC_DATASETS]
        if unknown:
            raise ValueError(f"unknown FGVC data sets {unknown}; expected some of {list(FGVC_DATASETS)}")
        return datasets

    def _source(self, dataset: str, split: str) -> SourceSpec:
        base = Path(self.root) / dataset
        if self.layout == "folder":
            return SourceSpec(kind="folder", path=absolute(base / split))
        return SourceSpec(kind="csv", path=absolute(base / f"{split}.csv"))

    def units(self, stage: Stage) -> list[Unit]:
        seeds = self.seeds if stage == "final" else (self.search_seeds or self.seeds[:1])
        units = []
        for dataset in self.datasets:
            for seed in seeds:
                splits = SplitSpec(
                    train=self._source(dataset, "train"),
                    test=self._source(dataset, "test"),
                    holdout_fraction=self.val_fraction,
                    holdout_seed=seed,
                )
                units.append(
                    Unit(
                        task=dataset,
                        split=f"train {1 - self.val_fraction:.0%} / val {self.val_fraction:.0%} (seed {seed})",
                        seed=seed,
                        split_seed=seed,
                        splits=splits,
                        evaluate_on="val" if stage == "search" else "test",
                        epoch_selection="val",
                        metric="accuracy",
                        tags={"num_classes": FGVC_DATASETS[dataset]},
                    )
                )
        return units

    def check(self) -> None:
        from promptvit.protocols.splits import source_class_names

        for dataset in self.datasets:
            for split in ("train", "test"):
                source = self._source(dataset, split)
                if not Path(source.path).exists():
                    raise ProtocolError(
                        f"FGVC {dataset}: {source.path} not found (layout '{self.layout}': "
                        "<root>/<dataset>/{train,test}/<class>/ or <root>/<dataset>/{train,test}.csv)"
                    )
            if self.check_num_classes:
                found = len(source_class_names(SplitSpec(train=self._source(dataset, "train"))))
                if found != FGVC_DATASETS[dataset]:
                    raise ProtocolError(
                        f"FGVC {dataset}: {found} classes in train, expected {FGVC_DATASETS[dataset]} "
                        "(set check_num_classes: false for a subset)"
                    )
