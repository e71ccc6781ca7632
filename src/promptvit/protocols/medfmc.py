"""MedFMC (chest, colon, endo): official N-way K-shot lists, honest selection, mean and std over exps.

* Training: ``{dataset}_{K}-shot_train_exp{E}.txt`` (K in 1, 5, 10; the five official exps), duplicates kept.
* Model selection (epoch and hyperparameters): ``trainval.txt`` minus the training files of that exp and
  every other image of their studies (endo), slides (colon) or babies (NeoJaundice)
  (``promptvit.data.load_medfmc_split``). The official chest/endo val files are never used: they contain
  most of their own training images (docs/protocols-and-recipes.md, "MedFMC model selection").
* Test: ``test_WithLabel.txt``, evaluated once per final run.
* Metric: mAP (mmcls definition, all classes) for chest and endo, top-1 accuracy for colon, NeoJaundice and
  Retino; AUC is recorded too.
* NeoJaundice and Retino (``datasets: [neojaundice, retino]``, folders ``NeoJaundice/`` and ``Retino/`` as the
  few-shot baseline ships them: ``images/``, ``fewshot-pool.txt`` or ``trainval.txt``, ``test.txt`` or
  ``test_WithLabel.txt``, lines ``name.png label``): the baseline publishes no K-shot lists in this format,
  so without ``{dataset}_{K}-shot_train_exp{E}.txt`` the K-shot set is drawn from the pool with the
  baseline's rule (K babies per class for NeoJaundice, K images per class for Retino), seed = exp.
* Any other name in ``datasets`` is a folder ``<root>/<name>/`` written by ``promptvit data fewshot --format
  medfmc --name <name>`` (your own data set in MedFMC's layout): its K-shot train lists, its validation
  lists (the rest of the pool, capped) and its test list are used as written; the metric is mAP for
  multi-label data, else accuracy.
* Tables report mean and std over the exps and the repeated training ``seeds``.
* Recipe ``ept-medfmc`` by default (``recipe: null`` turns it off): EPT's optimiser and schedule, MedFM's
  preprocessing (direct resize to the input size, ImageNet statistics), four training seeds per sampling
  (EPT Sec. 4), and the epoch selected as the authors' configs do: mAP for chest, top-1 for colon, multi-label
  AUC for endo (the reported metric stays mAP).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from promptvit.data import MEDFMC_CLASSES, DataError, medfmc_split_files
from promptvit.data.split_files import read_fewshot_folder
from promptvit.protocols.spec import Protocol, ProtocolError, Stage, Unit, absolute

MEDFMC_METRICS = {
    "chest": "map",
    "endo": "map",
    "colon": "accuracy",
    "neojaundice": "accuracy",
    "retino": "accuracy",
}
MEDFMC_SHOTS = (1, 5, 10)
MEDFMC_EXPS = (1, 2, 3, 4, 5)



class MedFMCProtocol(Protocol):
    """MedFMC from a root holding ``chest/``, ``colon/``, ``endo/`` (``images/`` + the split ``.txt`` files)."""

    kind: ClassVar[str] = "medfmc"
    task_order: ClassVar[tuple[str, ...]] = ("chest", "colon", "endo", "neojaundice", "retino")
    name: Literal["medfmc"] = "medfmc"
    root: str
    datasets: list[str] = Field(
        default_factory=lambda: ["chest", "colon", "endo"],
        description="chest, colon, endo, neojaundice, retino, or the name of a `data fewshot` folder in root",
    )
    shots: list[int] = Field(default_factory=lambda: list(MEDFMC_SHOTS))
    exps: list[int] = Field(default_factory=lambda: list(MEDFMC_EXPS))
    recipe: str | None = "ept-medfmc"
    seeds: list[int] | None = Field(
        None, description="training seeds repeated per exp (default: the recipe's, else [0])"
    )
    search_exps: list[int] | None = Field(None, description="exps used for the search (default: all)")
    search_seeds: list[int] | None = Field(None, description="seeds used for the search (default: first)")

    def _seeds(self) -> list[int]:
        return self.seeds if self.seeds is not None else self.recipe_value("seeds", [0])

    def _own(self, dataset: str) -> Path | None:
        """The `data fewshot` folder of a data set outside the benchmark's five, else None."""
        return None if dataset in MEDFMC_CLASSES else Path(self.root) / dataset

    def _metric(self, dataset: str) -> str:
        folder = self._own(dataset)
        if folder is None:
            return MEDFMC_METRICS[dataset]
        try:
            return "map" if read_fewshot_folder(folder)[0].multilabel else "accuracy"
        except DataError as error:
            raise ProtocolError(
                f"MedFMC data set '{dataset}' is not one of {list(MEDFMC_CLASSES)}, and {folder} is not a folder "
                f"written by `promptvit data fewshot --format medfmc --name {dataset}` ({error})"
            ) from None

    def _unit(self, dataset: str, shots: int, exp: int, seed: int, stage: Stage) -> Unit:
        select = self.recipe_value("select_metric", {}).get(dataset)
        own = self._own(dataset)
        data = (
            {"kind": "medfmc", "path": absolute(self.root), "dataset": dataset}
            if own is None
            else {"kind": "fewshot", "path": absolute(own)}
        )
        return Unit(
            task=dataset,
            shots=shots,
            split=f"exp{exp}",
            seed=seed,
            data={**data, "shots": shots, "exp": exp},
            evaluate_on="val" if stage == "search" else "test",
            epoch_selection="val",
            metric=self._metric(dataset),
            eval_resize=self.recipe_value("eval_resize", "model"),
            config_overrides={"train": {"select_metric": select}} if select else {},
            # the tag is part of the record's identity: records selected on the older val (training files
            # only left out) keep theirs, so they are not taken for this protocol's
            tags={
                "exp": exp,
                "val": "trainval minus train_exp and its studies (official val files not used)"
                if own is None
                else "the folder's val list (the rest of the pool, capped)",
            },
        )

    def units(self, stage: Stage) -> list[Unit]:
        exps = self.exps if stage == "final" else (self.search_exps or self.exps)
        seeds = self._seeds() if stage == "final" else (self.search_seeds or self._seeds()[:1])
        return [
            self._unit(dataset, shots, exp, seed, stage)
            for dataset in self.datasets
            for shots in self.shots
            for exp in exps
            for seed in seeds
        ]

    def check(self) -> None:
        for dataset in self.datasets:
            for shots in self.shots:
                for exp in sorted(set(self.exps) | set(self.search_exps or [])):
                    try:
                        if self._own(dataset) is None:
                            medfmc_split_files(self.root, dataset, shots, exp)
                        else:
                            self._metric(dataset)  # a clear error when it is no fewshot folder
                            read_fewshot_folder(self._own(dataset))[0].draw_files(shots, exp)
                    except DataError as error:
                        raise ProtocolError(str(error)) from None
