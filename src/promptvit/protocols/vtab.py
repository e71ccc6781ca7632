"""VTAB-1k (19 tasks) as in VPT: tune on train800 -> val200, final runs on train800val200, test at the LAST epoch.

Expected layout (prepared image folders, one sub-folder per class; class folder names may be the class
indices; a split may lack some classes, the union over the four splits defines the label set)::

    <root>/<task>/train800/<class>/*.jpg         the 800 training images of the 1k split
    <root>/<task>/val200/<class>/*.jpg           the 200 validation images
    <root>/<task>/train800val200/<class>/*.jpg   all 1000 (train800 + val200)
    <root>/<task>/test/<class>/*.jpg             the task's test split

``<task>`` is one of :data:`VTAB_TASKS` (e.g. ``cifar100``, ``smallnorb_ele``). Any image extension
promptvit reads is accepted.

Protocol (VPT ``tune_vtab.py``, spec §2):

* search: every grid point trains on train800 and is scored by val200 top-1 **at the last epoch** (no epoch
  selection; ties go to the smaller lr) with one seed (``search_seeds``, default 42);
* final: the chosen hyperparameters train on train800val200 with the 5 seeds {42, 44, 82, 100, 800}; the
  test top-1 **at the last epoch** is reported (no selection of any kind on test);
* preprocessing: a direct resize to the model's input size (224 for ViT-B/16), bilinear, ImageNet
  mean/std, **no augmentation** (not even flips) for training.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

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
VTAB_SEEDS = (42, 44, 82, 100, 800)
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
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
    seeds: list[int] = Field(default_factory=lambda: list(VTAB_SEEDS))
    search_seeds: list[int] = Field(default_factory=lambda: [VTAB_SEEDS[0]])
    normalization: Literal["imagenet", "backbone"] = Field(
        "imagenet", description="ImageNet mean/std as VPT, or the backbone config's own statistics"
    )

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in VTAB_GROUP_OF]
        if unknown:
            raise ValueError(f"unknown VTAB tasks {unknown}; the 19 tasks are {list(VTAB_TASKS)}")
        return tasks

    def _folder(self, task: str, split: str) -> SourceSpec:
        return SourceSpec(kind="folder", path=absolute(Path(self.root) / task / split))

    def units(self, stage: Stage) -> list[Unit]:
        overrides = (
            {"backbone": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
            if self.normalization == "imagenet"
            else {}
        )
        units = []
        for task in self.tasks:
            every = [self._folder(task, s) for s in VTAB_SPLITS]
            if stage == "search":
                splits = SplitSpec(
                    train=self._folder(task, "train800"),
                    val=self._folder(task, "val200"),
                    class_sources=every,
                )
                label, seeds = "train800 -> val200", self.search_seeds
            else:
                splits = SplitSpec(
                    train=self._folder(task, "train800val200"),
                    test=self._folder(task, "test"),
                    class_sources=every,
                )
                label, seeds = "train800val200 -> test", self.seeds
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
                        group=VTAB_GROUP_OF[task],
                        config_overrides=overrides,
                    )
                )
        return units

    def check(self) -> None:
        missing = [
            str(Path(self.root) / task / split)
            for task in self.tasks
            for split in VTAB_SPLITS
            if not (Path(self.root) / task / split).is_dir()
        ]
        if missing:
            shown = ", ".join(missing[:4]) + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else "")
            raise ProtocolError(
                f"VTAB-1k folders missing: {shown}. Expected <root>/<task>/"
                "{train800,val200,train800val200,test}/<class>/<image>"
            )
