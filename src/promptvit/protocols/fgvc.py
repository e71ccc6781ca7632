"""FGVC (CUB-200, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars): tune on validation, report test.

Layouts, detected per data set (``layout: auto``, the default):

* ``json``, VPT's released splits (``train.json``, ``val.json``, ``test.json``, each ``{"path": class_id}``)
  in the data sets' own folders, as VPT expects them::

      <root>/CUB_200_2011/{train,val,test}.json   paths relative to CUB_200_2011/images/
      <root>/nabirds/{train,val,test}.json        paths relative to nabirds/images/
      <root>/OxfordFlower/{train,val,test}.json   paths relative to OxfordFlower/ (jpg/...)
      <root>/Stanford-dogs/{train,val,test}.json  paths relative to Stanford-dogs/Images/
      <root>/Stanford-cars/{train,val,test}.json  paths relative to Stanford-cars/ (car_ims/...)

  (the folder may also be named by promptvit's name, e.g. ``<root>/cub/``). Search: train.json -> val.json.
  Final (``final_train``): ``train+val`` (default) trains on train.json + val.json and reports test.json at
  the last epoch; ``train`` trains on train.json, chooses the epoch on val.json, reports test.json.
* ``folder``: ``<root>/<dataset>/{train,test}/<class>/*.jpg``; or ``csv``: ``<root>/<dataset>/{train,test}.csv``
  with columns ``file,label``. Validation is then 10 % of the training set per class (stratified, seeded
  by the run's seed, disjoint by file); hyperparameters and the epoch are chosen on it.

``<dataset>`` is one of :data:`FGVC_DATASETS` (``cub``, ``nabirds``, ``flowers``, ``dogs``, ``cars``).
Training seeds are the recipe's (``vpt-fgvc``: five runs, 0-4, as VPT's FGVC runs are unseeded repeats;
``spt-fgvc`` and ``davpt-fgvc``: three, 0-2); ``seeds`` overrides them.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from promptvit.data import FGVC_FOLDERS
from promptvit.protocols.spec import Protocol, ProtocolError, SourceSpec, SplitSpec, Stage, Unit, absolute

FGVC_DATASETS: dict[str, int] = {"cub": 200, "nabirds": 555, "flowers": 102, "dogs": 120, "cars": 196}


class FGVCProtocol(Protocol):
    kind: ClassVar[str] = "fgvc"
    task_order: ClassVar[tuple[str, ...]] = tuple(FGVC_DATASETS)
    name: Literal["fgvc"] = "fgvc"
    recipe: str | None = "vpt-fgvc"
    root: str
    datasets: list[str] = Field(default_factory=lambda: list(FGVC_DATASETS))
    layout: Literal["auto", "json", "folder", "csv"] = "auto"
    final_train: Literal["train+val", "train"] = Field(
        "train+val", description="json layout: final runs train on train.json + val.json, or on train.json"
    )
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seeds: list[int] | None = Field(
        None, description="training seeds (default: the recipe's; vpt-fgvc: five runs, 0-4; no recipe: 0-4)"
    )
    search_seeds: list[int] | None = Field(None, description="default: the first seed")
    check_num_classes: bool = Field(True, description="require the canonical class count of each data set")

    @field_validator("datasets", mode="before")
    @classmethod
    def _known(cls, datasets: list[str]) -> list[str]:
        by_folder = {f.folder: name for name, f in FGVC_FOLDERS.items()}
        datasets = [by_folder.get(d, d) for d in datasets]  # VPT's folder names are accepted too
        unknown = [d for d in datasets if d not in FGVC_DATASETS]
        if unknown:
            raise ValueError(f"unknown FGVC data sets {unknown}; expected some of {list(FGVC_DATASETS)}")
        return datasets

    def _json_dir(self, dataset: str) -> Path:
        root = Path(self.root)
        for name in (FGVC_FOLDERS[dataset].folder, dataset):
            if (root / name / "train.json").is_file():
                return root / name
        return root / FGVC_FOLDERS[dataset].folder

    def _layout(self, dataset: str) -> str:
        if self.layout != "auto":
            return self.layout
        if (self._json_dir(dataset) / "train.json").is_file():
            return "json"
        return "csv" if (Path(self.root) / dataset / "train.csv").is_file() else "folder"

    def _source(self, dataset: str, split: str) -> SourceSpec:
        layout = self._layout(dataset)
        if layout == "json":
            base = self._json_dir(dataset)
            image_root = base / FGVC_FOLDERS[dataset].image_dir
            return SourceSpec(
                kind="json", path=absolute(base / f"{split}.json"), image_root=absolute(image_root)
            )
        base = Path(self.root) / dataset
        if layout == "folder":
            return SourceSpec(kind="folder", path=absolute(base / split))
        return SourceSpec(kind="csv", path=absolute(base / f"{split}.csv"))

    def _json_unit(self, dataset: str, seed: int, stage: Stage) -> Unit:
        train, val, test = (self._source(dataset, s) for s in ("train", "val", "test"))
        if stage == "search":
            splits = SplitSpec(train=train, val=val, class_sources=[test])
            label = "train.json -> val.json"
        elif self.final_train == "train+val":
            splits = SplitSpec(train=train, more_train=[val], test=test)
            label = "train.json + val.json -> test.json"
        else:
            splits = SplitSpec(train=train, val=val, test=test)
            label = "train.json -> test.json (epoch on val.json)"
        last = self.final_train == "train+val"
        return Unit(
            task=dataset,
            split=label,
            seed=seed,
            splits=splits,
            evaluate_on="val" if stage == "search" else "test",
            epoch_selection="last" if last else "val",
            metric="accuracy",
            tags={"num_classes": FGVC_DATASETS[dataset]},
        )

    def _seeds(self) -> list[int]:
        return self.seeds if self.seeds is not None else self.recipe_value("seeds", [0, 1, 2, 3, 4])

    def units(self, stage: Stage) -> list[Unit]:
        seeds = self._seeds() if stage == "final" else (self.search_seeds or self._seeds()[:1])
        units = []
        for dataset in self.datasets:
            for seed in seeds:
                if self._layout(dataset) == "json":
                    units.append(self._json_unit(dataset, seed, stage))
                    continue
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
            layout = self._layout(dataset)
            for split in ("train", "val", "test") if layout == "json" else ("train", "test"):
                source = self._source(dataset, split)
                if not Path(source.path).exists():
                    raise ProtocolError(
                        f"FGVC {dataset}: {source.path} not found (layout '{layout}': "
                        f"<root>/{FGVC_FOLDERS[dataset].folder}/{{train,val,test}}.json as released with VPT, "
                        "<root>/<dataset>/{train,test}/<class>/ or <root>/<dataset>/{train,test}.csv)"
                    )
            if layout == "json" and not Path(source.image_root or "").is_dir():
                raise ProtocolError(
                    f"FGVC {dataset}: image folder {source.image_root} not found; VPT's split files list "
                    "paths relative to it"
                )
            if self.check_num_classes:
                found = len(source_class_names(SplitSpec(train=self._source(dataset, "train"))))
                if found != FGVC_DATASETS[dataset]:
                    raise ProtocolError(
                        f"FGVC {dataset}: {found} classes in train, expected {FGVC_DATASETS[dataset]} "
                        "(set check_num_classes: false for a subset)"
                    )
