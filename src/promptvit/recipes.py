"""Named, versioned training recipes: what each paper's released code (or, without code, its text) sets.

A recipe fills the run-config keys a user did not set (``promptvit train --recipe NAME``, or a protocol's
``recipe``) and is recorded as ``train.recipe = "name@vN"`` in ``config.yaml``, ``metrics.json`` and the
artifact. Every value carries its source; ``promptvit recipes`` lists them and ``docs/recipes.md`` explains
where our reading departs from the code. A change of any value makes a new version, so a recorded label
always means the same numbers.

* ``settings``: dotted run-config keys (``train.lr``, ``backbone.mean``, ``data.train_scale``...);
* ``method_options``: per method, options that apply only when that method runs;
* ``protocol``: what a benchmark protocol does with the recipe (seeds per sampling, epoch selection, the
  selection metric per task, the evaluation resize, the papers' lr/wd grids).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from promptvit.errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclasses.dataclass(frozen=True)
class Setting:
    value: Any
    source: str


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    paper: str
    description: str
    settings: dict[str, Setting]
    method_options: dict[str, dict[str, Setting]] = dataclasses.field(default_factory=dict)
    protocol: dict[str, Setting] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name}@v{self.version}"

    def options_for(self, method: str | None) -> dict[str, Any]:
        """The method options this recipe sets for ``method`` (none for other methods)."""
        return {k: copy.deepcopy(s.value) for k, s in self.method_options.get(method or "", {}).items()}

    def run_settings(self, method: str | None) -> dict[str, Any]:
        """Dotted run-config keys -> values for a run of ``method`` (its method options included)."""
        values = {key: copy.deepcopy(s.value) for key, s in self.settings.items()}
        values.update({f"method.options.{k}": v for k, v in self.options_for(method).items()})
        values["train.recipe"] = self.label
        return values

    def protocol_value(self, key: str, default: Any = None) -> Any:
        setting = self.protocol.get(key)
        return default if setting is None else copy.deepcopy(setting.value)


# Sources. Spec sections refer to docs/recipes.md, which restates what the authors' code does.
_EPT = "EPT code (MedFM/mmcls 0.25), configs/vit-b16-ept + schedules/imagenet_dense.py"
_MEDFM_DATA = "MedFM configs/_base_/datasets/{chest,colon,endoscopy}.py"
_VPT = "VPT code, src/solver (optimizer.py, lr_scheduler.py) + configs/base-prompt.yaml"
_VPT_HEAD = "VPT code, src/models/mlp.py (kaiming fan_out) + vit_models.py (bias -log(99))"
_VPT_GRID = "VPT code, tune_vtab.py / tune_fgvc.py lr and wd grids"
_SPT = "SPT code, train.py + utils.py (param_groups_weight_decay, adjust_learning_rate)"
_SPT_README = "SPT README supervised/MoCo Dogs example"
_DAVPT = "DA-VPT code, train.py + params.py + configs/fgvc/vitb_cub200.yaml"
_AP = "AP paper (no code released)"

#: the newest version of each recipe, by name
RECIPES: dict[str, Recipe] = {}
#: every version of each recipe: name -> version -> recipe (an old label keeps meaning its numbers)
RECIPE_VERSIONS: dict[str, dict[int, Recipe]] = {}


#: every paper trains its linear baseline with its own optimiser and schedule, not to convergence (promptvit's
#: default for ``linear`` without a recipe)
_PAPER_LINEAR = {
    "linear": {
        "solver": Setting("sgd", "the papers' linear baselines train the head with the recipe's optimiser")
    }
}


def _register(recipe: Recipe) -> Recipe:
    recipe = dataclasses.replace(recipe, method_options={**_PAPER_LINEAR, **recipe.method_options})
    RECIPE_VERSIONS.setdefault(recipe.name, {})[recipe.version] = recipe
    if recipe.name not in RECIPES or recipe.version > RECIPES[recipe.name].version:
        RECIPES[recipe.name] = recipe
    return recipe


_register(
    Recipe(
        name="ept-medfmc",
        version=1,
        paper="EPT (Zu et al., MedIA 2024) on MedFMC",
        description="SGD 6e-4, wd 1e-4 on everything, per-epoch cosine, 20 epochs, batch 4, direct 224 resize",
        settings={
            "train.optimizer": Setting("sgd", _EPT),
            "train.lr": Setting(6e-4, _EPT),
            "train.scale_lr": Setting(False, _EPT + " (no lr scaling)"),
            "train.momentum": Setting(0.9, _EPT),
            "train.weight_decay": Setting(1e-4, _EPT),
            "train.weight_decay_rule": Setting("all", _EPT + ": one param group, every tensor decayed"),
            "train.schedule_unit": Setting("epoch", "mmcv CosineAnnealingLrUpdaterHook, by_epoch=True"),
            "train.warmup_epochs": Setting(0, _EPT + " (no warm-up)"),
            "train.min_lr": Setting(0.0, _EPT),
            "train.epochs": Setting(20, _EPT),
            "train.batch_size": Setting(4, _EPT + " (samples_per_gpu=4, one GPU)"),
            "train.head_init": Setting("normal_0.01", "mmcls 0.25 LinearClsHead init_cfg Normal(std=0.01)"),
            "backbone.mean": Setting(IMAGENET_MEAN, _MEDFM_DATA + " (ImageNet mean)"),
            "backbone.std": Setting(IMAGENET_STD, _MEDFM_DATA + " (ImageNet std)"),
            "backbone.options.pretrained_cfg_overlay.crop_pct": Setting(
                1.0, _MEDFM_DATA + ": test = Resize to the full input size, no crop (224 px: docs/recipes.md)"
            ),
            "backbone.options.pretrained_cfg_overlay.interpolation": Setting("bicubic", _MEDFM_DATA),
            "data.train_scale": Setting(
                [0.08, 1.0], _MEDFM_DATA + ": RandomResizedCrop, mmcls default scale"
            ),
            "data.hflip": Setting(True, _MEDFM_DATA + ": RandomFlip p=0.5"),
        },
        method_options={
            "ept": {
                "prompt_length": Setting(100, "EPT configs (d_p = 100)"),
                "init_std": Setting(0.02, "EPT code, medfmc/models/ept.py (N(0, 0.02))"),
                "way": Setting("pure_cat", "EPT code: only Pure_Cat is implemented"),
            },
        },
        protocol={
            "seeds": Setting([0, 1, 2, 3], "EPT paper Sec. 4: average of four runs for each sampling"),
            "eval_resize": Setting("direct", _MEDFM_DATA + ": test Resize, no center crop"),
            "select_metric": Setting(
                {"chest": "map", "colon": "accuracy", "endo": "auc"},
                "EPT/MedFM configs save_best: chest mAP, colon top-1, endo AUC_multilabel (mAP commented out)",
            ),
        },
        notes=(
            "MedFM trains at 384 px; EPT's prompt has 197 rows (224 px), so every method runs at 224 px.",
        ),
    )
)


def _vpt_settings(source_data: str, train_scale: list[float] | None, crop_pct: float, augment: bool):
    settings = {
        "train.optimizer": Setting("sgd", _VPT),
        "train.momentum": Setting(0.9, _VPT),
        "train.lr": Setting(
            0.25, "VPT per-task sheet example (dmlab base lr 0.25); chosen per task from the grid"
        ),
        "train.weight_decay": Setting(1e-3, "VPT per-task sheet example (dmlab wd 1e-3); grid below"),
        "train.scale_lr": Setting(True, _VPT + ": lr = base_lr x batch_size / 256"),
        "train.weight_decay_rule": Setting("all_but_head_bias", _VPT + ": no wd on last_layer.bias only"),
        "train.schedule_unit": Setting("epoch", _VPT + ": WarmupCosineSchedule stepped per epoch"),
        "train.warmup_epochs": Setting(10, _VPT + " (linear from 0)"),
        "train.min_lr": Setting(0.0, _VPT),
        "train.epochs": Setting(100, _VPT + " (TOTAL_EPOCH)"),
        "train.batch_size": Setting(128, _VPT + " (base config)"),
        "train.head_init": Setting("kaiming_fan_out_prior", _VPT_HEAD),
        "backbone.mean": Setting(IMAGENET_MEAN, source_data),
        "backbone.std": Setting(IMAGENET_STD, source_data),
        "backbone.options.pretrained_cfg_overlay.crop_pct": Setting(crop_pct, source_data),
        "data.augment": Setting(augment, source_data),
    }
    if train_scale is not None:
        settings["data.train_scale"] = Setting(train_scale, source_data)
        settings["data.hflip"] = Setting(True, source_data)
    return settings


_VPT_METHOD = {"vpt": {"dropout": Setting(0.1, "VPT demo.ipynb: every paper run sets prompt dropout 0.1")}}
_VPT_WD_GRID = [0.01, 0.001, 0.0001, 0.0]

_register(
    Recipe(
        name="vpt-vtab",
        version=1,
        paper="VPT (Jia et al., ECCV 2022) on VTAB-1k",
        description="SGD, lr x bs/256, 10-epoch warm-up + per-epoch cosine, 100 epochs, no augmentation",
        settings=_vpt_settings(
            "VPT code, src/data/datasets/tf_dataset.py: direct resize to 224, ImageNet mean/std, no augmentation",
            None,
            1.0,
            False,
        ),
        method_options=_VPT_METHOD,
        protocol={
            "seeds": Setting([42, 44, 82, 100, 800], "VPT demo.ipynb final runs"),
            "epoch_selection": Setting("last", "VPT demo.ipynb: test top-1 at the last epoch (is_last=True)"),
            "eval_resize": Setting("direct", "VPT tf_dataset.py: direct resize to 224"),
            "grid": Setting(
                {
                    "train.lr": [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05],
                    "train.weight_decay": _VPT_WD_GRID,
                },
                _VPT_GRID,
            ),
        },
    )
)

_register(
    Recipe(
        name="vpt-fgvc",
        version=1,
        paper="VPT (Jia et al., ECCV 2022) on FGVC",
        description="as vpt-vtab with Resize 256 -> crop 224 and flips",
        settings=_vpt_settings(
            "VPT code, src/data/transforms.py: train Resize 256 -> RandomCrop 224 -> flip, test Resize 256 -> "
            "CenterCrop 224, ImageNet mean/std",
            [0.765625, 0.765625],  # a 224 crop of a 256 resize keeps (224/256)^2 of the area
            224 / 256,
            True,
        ),
        method_options=_VPT_METHOD,
        protocol={
            "seeds": Setting([42, 44, 82, 100, 800], "VPT demo.ipynb final runs"),
            "epoch_selection": Setting("last", "VPT demo.ipynb (is_last=True); tune_fgvc picks lr/wd on val"),
            "grid": Setting(
                {"train.lr": [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1], "train.weight_decay": _VPT_WD_GRID},
                _VPT_GRID + " (tune_fgvc drops 0.05)",
            ),
        },
        notes=(
            "RandomCrop 224 of a 256 resize is approximated by RandomResizedCrop at area 0.766 (aspect 3/4-4/3).",
        ),
    )
)


def _fgvc_adamw(
    source: str, lr: Setting, wd: Setting, wd_head: Setting, min_lr: Setting, head_source: str
) -> dict[str, Setting]:
    return {
        "train.optimizer": Setting("adamw", source),
        "train.lr": lr,
        "train.scale_lr": Setting(False, source + " (no lr scaling)"),
        "train.weight_decay": wd,
        "train.head_weight_decay": wd_head,
        "train.weight_decay_rule": Setting("standard", source + ": no decay on biases and 1-D tensors"),
        "train.schedule_unit": Setting("step", source + ": schedule stepped per update"),
        "train.warmup_epochs": Setting(10, source),
        "train.min_lr": min_lr,
        "train.epochs": Setting(100, source),
        "train.batch_size": Setting(32, source),
        "train.head_init": Setting("trunc_normal_0.02", head_source),
        "backbone.mean": Setting(IMAGENET_MEAN, source + " (ImageNet mean)"),
        "backbone.std": Setting(IMAGENET_STD, source + " (ImageNet std)"),
        "backbone.options.pretrained_cfg_overlay.crop_pct": Setting(
            224 / 256, source + ": test Resize 256 -> CenterCrop 224"
        ),
        "data.train_scale": Setting([0.08, 1.0], source + ": RandomResizedCrop 224"),
        "data.hflip": Setting(True, source),
    }


_register(
    Recipe(
        name="spt-fgvc",
        version=1,
        paper="SPT (Wang et al., ICML 2024) on FGVC",
        description="AdamW, prompts decayed, own head wd, per-step warm-up + cosine, 100 epochs, batch 32",
        settings=_fgvc_adamw(
            _SPT,
            Setting(1e-3, _SPT_README),
            Setting(1e-2, "SPT README (wd 1e-2)"),
            Setting(3.0, _SPT_README + " (wd_head 3.0)"),
            Setting(1e-8, "SPT README (min_lr 1e-8)"),
            "SPT code, train.py create_model: head trunc_normal(std=0.02), bias 0",
        ),
        method_options={
            "spt": {
                "prompt_length": Setting(20, "SPT README: deep K = 20"),
                "deep": Setting(True, "SPT README"),
                "sampler": Setting("random", "SPT README scripts"),
            },
        },
        protocol={"seeds": Setting([0], "SPT code: one seed per run (per-task recipes not released)")},
        notes=("SPT's model EMA (decay 0.9999) is not implemented.",),
    )
)

_register(
    Recipe(
        name="davpt-fgvc",
        version=1,
        paper="DA-VPT (Ren et al., CVPR 2025) on FGVC (CUB config)",
        description="AdamW 5e-4, wd 0.05, head wd 5, per-step warm-up + cosine, 100 epochs, batch 32, fp16",
        settings={
            **_fgvc_adamw(
                _DAVPT,
                Setting(5e-4, _DAVPT + " (CUB lr 5e-4)"),
                Setting(0.05, _DAVPT + " (CUB wd 0.05)"),
                Setting(5.0, _DAVPT + " (CUB wd_head 5)"),
                Setting(1e-9, _DAVPT + " (min_lr 1e-9)"),
                "DA-VPT code, model_creator.py: head trunc_normal(std=0.02), bias 0",
            ),
            "train.precision": Setting("fp16", _DAVPT + " (fp16 autocast; CUDA only here)"),
            "backbone.options.pretrained_cfg_overlay.interpolation": Setting("bicubic", _DAVPT),
        },
        notes=(
            "DA-VPT clips gradients by value at 10; promptvit clips by norm only, so no clipping is set.",
            "DA-VPT samples batches with a ClassSampler (2 images per class); ours are shuffled.",
            "DA-VPT warms up from 1e-8; ours from 0.",
        ),
    )
)


def _ap(kind: str, lr: float) -> Recipe:
    return Recipe(
        name=f"ap-{kind}",
        version=1,
        paper="AP: Activation Prompts (Zhang et al., AISTATS 2026)",
        description=f"Adam lr {lr}, no weight decay, 100 epochs, batch 128, AP at the paper's layer",
        settings={
            "train.optimizer": Setting("adamw", _AP + " Sec. 5: Adam (AdamW with weight decay 0 is Adam)"),
            "train.lr": Setting(
                lr, _AP + f" App. A: lr {lr} for the {'ViT' if kind == 'vit' else 'ResNet'} family"
            ),
            "train.weight_decay": Setting(0.0, _AP + " App. A: no weight decay"),
            "train.weight_decay_rule": Setting("all", _AP + " (no decay anywhere; the rule is moot)"),
            "train.epochs": Setting(100, _AP + " Sec. 5 (App. A says 1000)"),
            "train.batch_size": Setting(128, _AP + " Tab. A1"),
        },
        method_options={
            "ap": {"variant": Setting("add", _AP + " (AP is the additive prompt)")},
        },
        notes=(
            "The paper gives no schedule, warm-up, head init or preprocessing; promptvit's defaults apply.",
            "AP's layer default (layer=None) is already the paper's: ViT block 3, a CNN's last stage.",
        ),
    )


_register(_ap("vit", 0.01))
_register(_ap("cnn", 0.001))


# ---------------------------------------------------------------------------------------- version 2
# v2 rechecks every value against the authors' released code and names real files (and lines where the
# value is one line); docs/recipes.md says what changed from v1.

_VPT_OPT = "VPT src/solver/optimizer.py:52-62 (SGD, every parameter decayed but last_layer.bias)"
_VPT_BASE = "VPT configs/base-prompt.yaml"
_VPT_SCHEDULE = (
    "VPT src/solver/lr_scheduler.py:9-20 (WARMUP_EPOCH, TOTAL_EPOCH as scheduler steps) + src/engine/trainer.py "
    "train_classifier (scheduler.step() once per epoch)"
)
_VPT_LR = (
    "VPT demo.ipynb, cell 14c5be87 (dmlab: 'base_lr = 1.0', 'lr = base_lr / 256 * cfg.DATA.BATCH_SIZE', so "
    "SOLVER.BASE_LR 0.25 at DATA.BATCH_SIZE 64): one task's base lr, the grid below holds the others"
)
_VPT_SCALE = "VPT tune_vtab.py:100, tune_fgvc.py:31 (lr = lr / 256 * cfg.DATA.BATCH_SIZE)"
_VPT_HEAD_V2 = (
    "VPT src/models/mlp.py:52-57 (kaiming_normal_ fan_out; special_bias: -log((1 - 0.01) / 0.01)), "
    "src/models/vit_models.py setup_head (special_bias=True)"
)
_VPT_GRID_V2 = "VPT tune_vtab.py get_lrwd_range ('prompt'), tune_fgvc.py:151-157 (prompt_main: no 0.05)"
_VPT_VTAB_DATA = (
    "VPT src/data/datasets/tf_dataset.py preprocess_fn (tf.image.resize to 224, bilinear; /255) + TFDataset "
    "(ImageNet mean/std), no augmentation"
)
_VPT_FGVC_DATA = (
    "VPT src/data/transforms.py:7-40 (train Resize 256 -> RandomCrop 224 -> flip 0.5, test Resize 256 -> "
    "CenterCrop 224; torchvision Resize is bilinear; ImageNet mean/std)"
)


def _vpt_settings_v2(source_data: str, train_scale: list[float] | None, crop_pct: float, augment: bool):
    settings = {
        "train.optimizer": Setting("sgd", _VPT_OPT + " + " + _VPT_BASE + ":14"),
        "train.momentum": Setting(0.9, _VPT_BASE + ":15"),
        "train.lr": Setting(1.0, _VPT_LR),
        "train.weight_decay": Setting(1e-3, "VPT demo.ipynb, cell 14c5be87 (dmlab SOLVER.WEIGHT_DECAY 0.001)"),
        "train.scale_lr": Setting(True, _VPT_SCALE),
        "train.weight_decay_rule": Setting("all_but_head_bias", _VPT_OPT),
        "train.schedule_unit": Setting("epoch", _VPT_SCHEDULE),
        "train.warmup_epochs": Setting(10, _VPT_BASE + ":18 (WARMUP_EPOCH; linear from 0: lr_scheduler.py)"),
        "train.min_lr": Setting(0.0, "VPT src/solver/lr_scheduler.py WarmupCosineSchedule (cosine to 0)"),
        "train.epochs": Setting(100, _VPT_BASE + ":19 (TOTAL_EPOCH)"),
        "train.batch_size": Setting(128, _VPT_BASE + ":25 (DATA.BATCH_SIZE)"),
        "train.head_init": Setting("kaiming_fan_out_prior", _VPT_HEAD_V2),
        "backbone.mean": Setting(IMAGENET_MEAN, source_data),
        "backbone.std": Setting(IMAGENET_STD, source_data),
        "backbone.options.pretrained_cfg_overlay.crop_pct": Setting(crop_pct, source_data),
        "backbone.options.pretrained_cfg_overlay.interpolation": Setting("bilinear", source_data),
        "data.augment": Setting(augment, source_data),
    }
    if train_scale is not None:
        settings["data.train_scale"] = Setting(train_scale, source_data)
        settings["data.hflip"] = Setting(True, source_data)
    return settings


_VPT_METHOD_V2 = {
    "vpt": {
        "dropout": Setting(
            0.1, "VPT demo.ipynb, cell 14c5be87 (MODEL.PROMPT.DROPOUT 0.1 in every paper run; config default 0)"
        )
    }
}
_VPT_LR_GRID = [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05]

_register(
    Recipe(
        name="vpt-vtab",
        version=2,
        paper="VPT (Jia et al., ECCV 2022) on VTAB-1k",
        description="SGD base lr 1.0 x bs/256, 10-epoch warm-up + per-epoch cosine, 100 epochs, no augmentation",
        settings=_vpt_settings_v2(_VPT_VTAB_DATA, None, 1.0, False),
        method_options=_VPT_METHOD_V2,
        protocol={
            "seeds": Setting([42, 44, 82, 100, 800], "VPT tune_vtab.py main() (random_seeds, final runs)"),
            "epoch_selection": Setting(
                "last", "VPT tune_vtab.py find_best_lrwd (val top-1 of the last epoch); demo.ipynb is_last=True"
            ),
            "eval_resize": Setting("direct", _VPT_VTAB_DATA),
            "grid": Setting({"train.lr": _VPT_LR_GRID, "train.weight_decay": _VPT_WD_GRID}, _VPT_GRID_V2),
        },
        notes=(
            "v2: base lr 1.0 (v1 had 0.25, demo.ipynb's already-scaled value), so the peak lr at batch 128 is 0.5; "
            "bilinear resize stated by the recipe; sources name files and lines.",
        ),
    )
)

_register(
    Recipe(
        name="vpt-fgvc",
        version=2,
        paper="VPT (Jia et al., ECCV 2022) on FGVC",
        description="as vpt-vtab@v2 with Resize 256 -> crop 224 (bilinear) and flips; five unseeded runs",
        settings=_vpt_settings_v2(_VPT_FGVC_DATA, [0.765625, 0.765625], 224 / 256, True),
        method_options=_VPT_METHOD_V2,
        protocol={
            "seeds": Setting(
                [0, 1, 2, 3, 4],
                "VPT sets no seed for FGVC (src/configs/config.py:27 SEED None; train.py seeds only when set) and "
                "repeats a setting up to RUN_N_TIMES = 5 times (config.py:15): five runs, seeds 0-4 ours",
            ),
            "epoch_selection": Setting(
                "last", "VPT src/engine/trainer.py (test scored every epoch, reported at the last); tune_fgvc picks "
                "lr/wd on val"
            ),
            "grid": Setting(
                {"train.lr": _VPT_LR_GRID[:-1], "train.weight_decay": _VPT_WD_GRID}, _VPT_GRID_V2
            ),
        },
        notes=(
            "RandomCrop 224 of a 256 resize is approximated by RandomResizedCrop at area 0.766 (aspect 3/4-4/3).",
            "v2: base lr 1.0 (v1: 0.25), bilinear resizing (v1: bicubic), the seeds are the FGVC runs' own "
            "(v1 listed VTAB's, which the FGVC protocol never read).",
        ),
    )
)

_SPT_CODE = "SPT code (Self-Prompt-Tuning)"
_SPT_V2 = _SPT_CODE + ", train.py main() (AdamW over param_groups_weight_decay) + utils.py adjust_learning_rate"
_SPT_THREE = (
    "SPT paper Sec. 4.1 (mean of three runs); the code sets no seed (train.py has no --seed), seeds 0-2 ours"
)

_register(
    Recipe(
        name="spt-fgvc",
        version=2,
        paper="SPT (Wang et al., ICML 2024) on FGVC",
        description="AdamW, prompts decayed, own head wd, per-step warm-up + cosine, 100 epochs, batch 32, 3 seeds",
        settings=_fgvc_adamw(
            _SPT_V2,
            Setting(1e-3, _SPT_README),
            Setting(1e-2, "SPT README (wd 1e-2)"),
            Setting(3.0, _SPT_README + " (wd_head 3.0)"),
            Setting(1e-8, "SPT README (min_lr 1e-8)"),
            _SPT_CODE + ", train.py create_model (timm trunc_normal_(head.weight, std=.02), bias 0)",
        ),
        method_options={
            "spt": {
                "prompt_length": Setting(20, "SPT README: deep K = 20"),
                "deep": Setting(True, "SPT README"),
                "sampler": Setting("random", "SPT README scripts (--prompt_sample_type random)"),
            },
        },
        protocol={"seeds": Setting([0, 1, 2], _SPT_THREE)},
        notes=(
            "SPT's model EMA (decay 0.9999) is not implemented.",
            "v2: three seeds (v1: one); sources name the real files.",
        ),
    )
)

_DAVPT_CODE = "DA-VPT code (Noahsark/DA-VPT)"
_DAVPT_CUB = "DA-VPT configs/fgvc/vitb_cub200.yaml (params.py's default --config)"
_DAVPT_TRAIN = "DA-VPT train.py"
_DAVPT_V2 = _DAVPT_TRAIN + " (AdamW over utils param_groups_weight_decay, timm create_scheduler) + params.py"

_register(
    Recipe(
        name="davpt-fgvc",
        version=2,
        paper="DA-VPT (Ren et al., CVPR 2025) on FGVC (CUB config)",
        description="the released CUB config: guided blocks 10-11, DA-VPT+ biases, l2 prompts, prompt mask, "
        "drop path 0.1, clip 10, class sampler, 3 seeds",
        settings={
            **_fgvc_adamw(
                _DAVPT_V2,
                Setting(5e-4, _DAVPT_CUB + " (lr 5e-4)"),
                Setting(0.05, _DAVPT_CUB + " (weight_decay 0.05)"),
                Setting(5.0, _DAVPT_CUB + " (wd_head 5)"),
                Setting(1e-9, _DAVPT_CUB + " (min_lr 1e-9)"),
                _DAVPT_CODE + ", model_creator.py create_model: new Linear head, timm trunc_normal_(std=.02), bias 0",
            ),
            "train.precision": Setting("fp16", _DAVPT_TRAIN + " train(): autocast() + GradScaler (fp16; CUDA only here)"),
            "train.grad_clip_value": Setting(
                10.0, _DAVPT_TRAIN + ":163-165 (clip_grad_value_(..., clip_value=10.0) after scaler.unscale_)"
            ),
            "train.sampler": Setting(
                "class_balanced",
                _DAVPT_TRAIN + ":55-69 + Dataset/class_sampler.py ClassSampler (class_sampler: true in the config)",
            ),
            "train.samples_per_class": Setting(2, "DA-VPT params.py (--samples_per_class 2)"),
            "backbone.options.drop_path_rate": Setting(
                0.1,
                _DAVPT_CUB + " (drop_path 0.1, passed by model_creator.py create_model); models/vpt.py "
                "_rebuild_blocks: linspace(0, rate, depth); train.py:118 model.train()",
            ),
            "backbone.options.pretrained_cfg_overlay.interpolation": Setting(
                "bicubic", "DA-VPT Dataset transforms: RandomResizedCrop(224, bicubic)"
            ),
        },
        method_options={
            "da_vpt": {
                "guided_layers": Setting(
                    [-2, -1],
                    _DAVPT_CUB + " (proxy_prompt_start_idx 10, proxy_prompt_end_idx 11 of ViT-B's 12 blocks): the "
                    "last two blocks, at any depth",
                ),
                "num_proxy_prompts": Setting(10, _DAVPT_CUB + " (proxy_prompt_len 10)"),
                "prompt_length": Setting(10, _DAVPT_CUB + " (num_prompts 10)"),
                "beta": Setting(0.05, _DAVPT_CUB + " (vpt_loss_weight 0.05)"),
                "lam": Setting(0.05, _DAVPT_CUB + " (cls_loss_weight 0.05)"),
                "bias_set": Setting(
                    "full_released",
                    _DAVPT_CUB + " (bias_k, bias_v, bias_proj, bias_fc2, bias_norm2, norm_norm1, train_cls) via "
                    "model_creator.py create_model (learnable_list)",
                ),
                "prompt_norm": Setting("l2", _DAVPT_CUB + " (vpt_norm: l2); models/vpt.py L2NormalizationLayer"),
                "prompt_mask": Setting(True, _DAVPT_CUB + " (mask: true); models/attn.py _generate_mask"),
                "update_mapping_from_epoch": Setting(
                    2,
                    _DAVPT_CUB + " (dynamic_kmeans 1) with train.py:121-125 (epoch >= dynamic_kmeans, epochs "
                    "counted from 0): from the second epoch",
                ),
            },
        },
        protocol={
            "seeds": Setting(
                [0, 1, 2],
                "DA-VPT paper Sec. 4 (mean of three runs with different seeds); params.py --seed default 0; "
                "seeds 0-2 ours",
            )
        },
        notes=(
            "The configs' YAML files were not readable where this recipe was written; their values come from the "
            "project's research notes on the released code (the CUB config): see docs/recipes.md.",
            "DA-VPT warms up from 1e-7 (params.py --warmup_lr); ours from 0.",
            "The authors' sampler draws each batch's classes at random; ours draws every class equally often per "
            "epoch (promptvit.train.sampling).",
            "v2: the CUB config's own settings (v1 kept promptvit's DA-VPT defaults), three seeds.",
        ),
    )
)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``: its newest version, or the version ``name@vN`` names."""
    base, _, version = name.partition("@")
    versions = RECIPE_VERSIONS.get(base)
    if versions is None:
        raise ConfigError(
            f"unknown recipe '{name}'; available: {', '.join(sorted(RECIPES))} (promptvit recipes)"
        )
    if not version:
        return RECIPES[base]
    number = version[1:] if version.startswith("v") else ""
    if not number.isdigit() or int(number) not in versions:
        labels = ", ".join(versions[v].label for v in sorted(versions))
        raise ConfigError(f"recipe '{base}' has no version '{version}'; its versions: {labels}")
    return versions[int(number)]


def _is_set(raw: dict[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def apply_recipe(raw: dict[str, Any], name: str, method: str | None = None) -> dict[str, Any]:
    """``raw`` (a run-config dict) with the recipe's values filled in where ``raw`` sets nothing.

    ``method`` defaults to ``raw['method']['name']``. Keys the user set win; the recipe's label is recorded as
    ``train.recipe`` (an error if ``raw`` names another recipe).
    """
    recipe = get_recipe(name)
    raw = copy.deepcopy(raw)
    recorded = (raw.get("train") or {}).get("recipe")
    if recorded not in (None, recipe.label):
        raise ConfigError(f"train.recipe is '{recorded}' but recipe '{recipe.label}' was asked for; drop one")
    method = method or (raw.get("method") or {}).get("name")
    if recorded is None and isinstance(raw.get("train"), dict):  # `recipe: null` left by a config: the label wins
        raw["train"].pop("recipe", None)
    for dotted, value in recipe.run_settings(method).items():
        if _is_set(raw, dotted):
            continue
        *sections, key = dotted.split(".")
        node = raw
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"cannot apply recipe '{recipe.label}': '{part}' of {dotted} is not a section"
                )
        node[key] = value
    return raw


def describe(recipe: Recipe) -> list[tuple[str, str, str]]:
    """(key, value, source) rows: settings, method options and protocol entries."""
    rows = [(k, repr(s.value), s.source) for k, s in recipe.settings.items()]
    for method, options in recipe.method_options.items():
        rows += [(f"method[{method}].{k}", repr(s.value), s.source) for k, s in options.items()]
    rows += [(f"protocol.{k}", repr(s.value), s.source) for k, s in recipe.protocol.items()]
    return rows
