"""VTAB-1k (19 tasks) as in VPT: tune on train800 -> val200, final runs on train800val200, test at the LAST epoch.

Two layouts, detected per task (``layout: auto``, the default):

* ``lists``, the copy most papers use (NOAH, SSF, RepAdapter, PETL_Vision)::

      <root>/<folder>/train800.txt         one 'relative/path label' per line, paths relative to <folder>
      <root>/<folder>/val200.txt
      <root>/<folder>/train800val200.txt
      <root>/<folder>/test.txt
      <root>/<folder>/images/...           (wherever the lists point)

  ``<folder>`` is the distribution's name (``cifar`` for CIFAR-100, ``oxford_iiit_pet``, ``smallnorb_azi``...)
  or promptvit's task name; :data:`promptvit.data.VTAB_NAMES` maps the names. A copy with only
  ``train800val200.txt`` and ``test.txt`` runs the final stage; a search stage on it is refused with the
  missing files named (fix the hyperparameters instead, or add the two files).
* ``folders``, prepared image folders, one sub-folder per class::

      <root>/<task>/{train800,val200,train800val200,test}/<class>/*.jpg

In both, a split may lack some classes: the union over the splits defines the label set.

``<task>`` is one of :data:`VTAB_TASKS` (e.g. ``cifar100``, ``smallnorb_ele``); the distribution's folder
names and the task_adaptation names (``cifar(num_classes=100)``) are accepted too. Any other name is your
own task in the same four-list shape as ``promptvit data fewshot --format vtab`` writes it::

      <root>/<name>/train.txt, val.txt, trainval.txt, test.txt    (e.g. root: out/5-shot, tasks: [seed1])

read as train800, val200, train800val200 and test (group ``own``).

Protocol (VPT's ``tune_vtab.py``; docs/protocols-and-recipes.md, "VTAB-1k protocol"):

* search: every grid point trains on train800 and is scored by val200 top-1 **at the last epoch** (no epoch
  selection; ties go to the smaller lr) with one seed (``search_seeds``, default the first seed, 42);
* final: the chosen hyperparameters train on train800val200 with the recipe's seeds (``vpt-vtab``: VPT's
  {42, 44, 82, 100, 800}; ``seeds`` overrides them); the test top-1 **at the last epoch** is reported (no
  selection of any kind on test);
* preprocessing: a direct resize to the model's input size (224 for ViT-B/16), bilinear, ImageNet
  mean/std, **no augmentation** (not even flips) for training.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from promptvit.data import VTAB_LIST_FILES, VTAB_NAMES, DataError, vtab_task
from promptvit.protocols.spec import Protocol, ProtocolError, SourceSpec, SplitSpec, Stage, Unit, absolute

VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    "natural": (
        "cifar100",
        "caltech101",
        "dtd",
        "oxford_flowers102",
        "oxford_iiit_pet",
        "svhn",
        "sun397",
    ),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": (
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ),
}
VTAB_TASKS: tuple[str, ...] = tuple(t for tasks in VTAB_GROUPS.values() for t in tasks)
VTAB_GROUP_OF: dict[str, str] = {t: g for g, tasks in VTAB_GROUPS.items() for t in tasks}
#: the list files of an own task (``promptvit data fewshot --format vtab``) standing for VTAB-1k's four
OWN_LIST_FILES = {"train800": "train.txt", "val200": "val.txt", "train800val200": "trainval.txt", "test": "test.txt"}
VTAB_SEEDS = (42, 44, 82, 100, 800)
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
SEARCH_SPLITS = ("train800", "val200")
FINAL_SPLITS = ("train800val200", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VTABProtocol(Protocol):
    """VTAB-1k from ``root`` (see the module docstring for the folder layout)."""

    kind: ClassVar[str] = "vtab"
    task_order: ClassVar[tuple[str, ...]] = VTAB_TASKS
    name: Literal["vtab"] = "vtab"
    recipe: str | None = "vpt-vtab"
    root: str
    tasks: list[str] = Field(default_factory=lambda: list(VTAB_TASKS))
    seeds: list[int] | None = Field(
        None, description="final-stage training seeds (default: the recipe's, else VPT's five)"
    )
    search_seeds: list[int] | None = Field(None, description="search-stage seeds (default: the first seed)")
    normalization: Literal["imagenet", "backbone"] = Field(
        "imagenet", description="ImageNet mean/std as VPT, or the backbone config's own statistics"
    )
    layout: Literal["auto", "lists", "folders"] = Field(
        "auto", description="lists: the VTAB-1k .txt copy; folders: <split>/<class>/ image folders"
    )

    @model_validator(mode="after")
    def _known(self) -> VTABProtocol:
        known = []
        for task in self.tasks:
            try:
                known.append(vtab_task(task))
            except DataError as error:
                if not (Path(self.root) / task / OWN_LIST_FILES["train800"]).is_file():
                    raise ValueError(
                        f"{error}, or the name of a folder in {self.root} holding train.txt, val.txt, "
                        "trainval.txt and test.txt (promptvit data fewshot --format vtab)"
                    ) from None
                known.append(task)  # an own task in the four-list shape
        self.__dict__["tasks"] = known
        return self

    def _task_dir(self, task: str) -> Path:
        """The distribution's folder name if present, else promptvit's task name (an own task: its name)."""
        root = Path(self.root)
        names = (VTAB_NAMES[task].folder, task) if task in VTAB_NAMES else (task,)
        for name in names:
            if (root / name).is_dir():
                return root / name
        return root / task

    def _layout(self, task: str) -> str:
        if task not in VTAB_NAMES:
            return "own"
        if self.layout != "auto":
            return self.layout
        base = self._task_dir(task)
        return "lists" if any((base / f).is_file() for f in VTAB_LIST_FILES.values()) else "folders"

    def _files(self, task: str) -> dict[str, str]:
        return OWN_LIST_FILES if self._layout(task) == "own" else VTAB_LIST_FILES

    def _missing(self, task: str, splits: tuple[str, ...]) -> list[str]:
        base = self._task_dir(task)
        if self._layout(task) != "folders":
            files = self._files(task)
            return [files[s] for s in splits if not (base / files[s]).is_file()]
        return [f"{s}/" for s in splits if not (base / s).is_dir()]

    def _source(self, task: str, split: str) -> SourceSpec:
        base = self._task_dir(task)
        if self._layout(task) != "folders":
            return SourceSpec(kind="list", path=absolute(base / self._files(task)[split]))
        return SourceSpec(kind="folder", path=absolute(base / split))

    def _class_sources(self, task: str) -> list[SourceSpec]:
        if self._layout(task) == "folders":
            return [self._source(task, s) for s in VTAB_SPLITS]
        present = [s for s in VTAB_SPLITS if not self._missing(task, (s,))]
        return [self._source(task, s) for s in present]

    def _search_needs(self, task: str) -> None:
        missing = self._missing(task, SEARCH_SPLITS)
        if missing and self._layout(task) != "folders":
            base = self._task_dir(task)
            raise ProtocolError(
                f"VTAB-1k {task}: the search stage (train800 -> val200) needs {' and '.join(missing)} in "
                f"{base}, which this copy lacks (it ships {', '.join(self._present(base))}). Fallback: give "
                "fixed hyperparameters (one grid point per method), so only the final stage "
                "(train800val200 -> test) runs, or add the missing files from the full VTAB-1k copy."
            )

    @staticmethod
    def _present(base: Path) -> list[str]:
        return [f for f in VTAB_LIST_FILES.values() if (base / f).is_file()] or ["no list files"]

    def _seeds(self) -> list[int]:
        return self.seeds if self.seeds is not None else self.recipe_value("seeds", list(VTAB_SEEDS))

    def units(self, stage: Stage) -> list[Unit]:
        overrides = (
            {"backbone": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
            if self.normalization == "imagenet"
            else {}
        )
        units = []
        for task in self.tasks:
            every = self._class_sources(task)
            if stage == "search":
                self._search_needs(task)
                splits = SplitSpec(
                    train=self._source(task, "train800"),
                    val=self._source(task, "val200"),
                    class_sources=every,
                )
                label, seeds = "train800 -> val200", self.search_seeds or self._seeds()[:1]
            else:
                splits = SplitSpec(
                    train=self._source(task, "train800val200"),
                    test=self._source(task, "test"),
                    class_sources=every,
                )
                label, seeds = "train800val200 -> test", self._seeds()
            for seed in seeds:
                units.append(
                    Unit(
                        task=task,
                        split=label,
                        seed=seed,
                        splits=splits,
                        evaluate_on="val" if stage == "search" else "test",
                        epoch_selection="last",
                        metric="accuracy",
                        augment=False,
                        eval_resize="direct",
                        interpolation="bilinear",
                        group=VTAB_GROUP_OF.get(task, "own"),
                        config_overrides=overrides,
                    )
                )
        return units

    def check(self) -> None:
        """The final stage's files must exist (the search stage's are checked when a search is planned)."""
        problems = []
        for task in self.tasks:
            needed = VTAB_SPLITS if self._layout(task) == "folders" else FINAL_SPLITS
            missing = self._missing(task, needed)
            if missing:
                problems.append(f"{self._task_dir(task)}: {', '.join(missing)}")
        if problems:
            shown = "; ".join(problems[:4]) + (
                f" (and {len(problems) - 4} more tasks)" if len(problems) > 4 else ""
            )
            raise ProtocolError(
                f"VTAB-1k data missing: {shown}. Expected <root>/<task>/ with train800.txt, val200.txt, "
                "train800val200.txt, test.txt (the VTAB-1k list copy; the final stage needs the last two) or "
                "<root>/<task>/{train800,val200,train800val200,test}/<class>/<image>"
            )
