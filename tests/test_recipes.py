"""Recipes: each resolves to the values the paper's code sets (a table per recipe), wd groups per method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import promptvit
from promptvit.backbones import create_backbone
from promptvit.methods.base import ConfigError
from promptvit.recipes import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECIPE_VERSIONS,
    RECIPES,
    apply_recipe,
    describe,
    get_recipe,
)
from promptvit.run_config import RunConfig
from promptvit.train import TrainConfig
from promptvit.train.optim import build_optimizer, build_scheduler, decay_group_of
from tests.cli.test_cli import invoke, write_config, write_image_folder
from tests.conftest import build_tiny

# Expected values per recipe version, written out from the papers' code (docs/recipes.md), not from recipes.py.
_VPT_TRAIN = dict(
    optimizer="sgd",
    lr=0.25,
    scale_lr=True,
    momentum=0.9,
    weight_decay=1e-3,
    weight_decay_rule="all_but_head_bias",
    head_weight_decay=None,
    schedule_unit="epoch",
    warmup_epochs=10,
    min_lr=0.0,
    epochs=100,
    batch_size=128,
    head_init="kaiming_fan_out_prior",
    precision="fp32",
    grad_clip_value=None,
    sampler="shuffle",
)
_SPT_TRAIN = dict(
    optimizer="adamw",
    lr=1e-3,
    scale_lr=False,
    weight_decay=1e-2,
    weight_decay_rule="standard",
    head_weight_decay=3.0,
    schedule_unit="step",
    warmup_epochs=10,
    min_lr=1e-8,
    epochs=100,
    batch_size=32,
    head_init="trunc_normal_0.02",
    precision="fp32",
    grad_clip_value=None,
    sampler="shuffle",
)
_DAVPT_TRAIN = dict(
    _SPT_TRAIN, lr=5e-4, weight_decay=0.05, head_weight_decay=5.0, min_lr=1e-9, precision="fp16"
)
EXPECTED_TRAIN = {
    "ept-medfmc@v1": dict(
        optimizer="sgd",
        lr=6e-4,
        scale_lr=False,
        momentum=0.9,
        weight_decay=1e-4,
        weight_decay_rule="all",
        head_weight_decay=None,
        schedule_unit="epoch",
        warmup_epochs=0,
        min_lr=0.0,
        epochs=20,
        batch_size=4,
        head_init="normal_0.01",
        precision="fp32",
    ),
    "vpt-vtab@v1": _VPT_TRAIN,
    "vpt-fgvc@v1": _VPT_TRAIN,
    # demo.ipynb: base_lr = 1.0 for dmlab, scaled by batch / 256 (0.25 at batch 64, 0.5 at 128)
    "vpt-vtab@v2": dict(_VPT_TRAIN, lr=1.0),
    "vpt-fgvc@v2": dict(_VPT_TRAIN, lr=1.0),
    "spt-fgvc@v1": _SPT_TRAIN,
    "spt-fgvc@v2": _SPT_TRAIN,
    "davpt-fgvc@v1": _DAVPT_TRAIN,
    # DA-VPT train.py: clip_grad_value_(10) after unscaling; ClassSampler with 2 images per class
    "davpt-fgvc@v2": dict(_DAVPT_TRAIN, grad_clip_value=10.0, sampler="class_balanced", samples_per_class=2),
    "ap-vit@v1": dict(optimizer="adamw", lr=0.01, weight_decay=0.0, epochs=100, batch_size=128),
    "ap-cnn@v1": dict(optimizer="adamw", lr=0.001, weight_decay=0.0, epochs=100, batch_size=128),
}
# Preprocessing: mean/std, eval crop_pct, train_scale, hflip, augment, interpolation; None = promptvit's default.
_VPT_FGVC_CROP = [0.765625, 0.765625]
EXPECTED_DATA = {
    "ept-medfmc@v1": (IMAGENET_MEAN, 1.0, [0.08, 1.0], True, True, "bicubic"),
    "vpt-vtab@v1": (IMAGENET_MEAN, 1.0, None, None, False, None),
    "vpt-fgvc@v1": (IMAGENET_MEAN, 0.875, _VPT_FGVC_CROP, True, True, None),
    "vpt-vtab@v2": (IMAGENET_MEAN, 1.0, None, None, False, "bilinear"),  # tf.image.resize
    "vpt-fgvc@v2": (IMAGENET_MEAN, 0.875, _VPT_FGVC_CROP, True, True, "bilinear"),  # torchvision Resize
    "spt-fgvc@v1": (IMAGENET_MEAN, 0.875, [0.08, 1.0], True, True, None),
    "spt-fgvc@v2": (IMAGENET_MEAN, 0.875, [0.08, 1.0], True, True, None),
    "davpt-fgvc@v1": (IMAGENET_MEAN, 0.875, [0.08, 1.0], True, True, "bicubic"),
    "davpt-fgvc@v2": (IMAGENET_MEAN, 0.875, [0.08, 1.0], True, True, "bicubic"),
    "ap-vit@v1": (None, None, None, None, True, None),
    "ap-cnn@v1": (None, None, None, None, True, None),
}
# Backbone build options besides the preprocessing overlay.
EXPECTED_BACKBONE = {"davpt-fgvc@v2": {"drop_path_rate": 0.1}}
_VPT_SEEDS = [42, 44, 82, 100, 800]
EXPECTED_PROTOCOL = {
    "ept-medfmc@v1": {"seeds": [0, 1, 2, 3], "eval_resize": "direct", "endo_select": "auc"},
    "vpt-vtab@v1": {"seeds": _VPT_SEEDS, "epoch_selection": "last", "eval_resize": "direct"},
    "vpt-fgvc@v1": {"seeds": _VPT_SEEDS, "epoch_selection": "last"},
    "vpt-vtab@v2": {"seeds": _VPT_SEEDS, "epoch_selection": "last", "eval_resize": "direct"},
    # VPT's FGVC runs are unseeded, up to RUN_N_TIMES = 5 repeats
    "vpt-fgvc@v2": {"seeds": [0, 1, 2, 3, 4], "epoch_selection": "last"},
    "spt-fgvc@v1": {"seeds": [0]},
    "spt-fgvc@v2": {"seeds": [0, 1, 2]},  # the papers' mean of three runs
    "davpt-fgvc@v1": {},
    "davpt-fgvc@v2": {"seeds": [0, 1, 2]},
    "ap-vit@v1": {},
    "ap-cnn@v1": {},
}
_SPT_OPTIONS = {"prompt_length": 20, "deep": True, "sampler": "random"}
EXPECTED_METHOD = {
    "ept-medfmc@v1": ("ept", {"prompt_length": 100, "init_std": 0.02, "way": "pure_cat"}),
    "vpt-vtab@v1": ("vpt", {"dropout": 0.1}),
    "vpt-fgvc@v1": ("vpt", {"dropout": 0.1}),
    "vpt-vtab@v2": ("vpt", {"dropout": 0.1}),
    "vpt-fgvc@v2": ("vpt", {"dropout": 0.1}),
    "spt-fgvc@v1": ("spt", _SPT_OPTIONS),
    "spt-fgvc@v2": ("spt", _SPT_OPTIONS),
    "davpt-fgvc@v1": ("da_vpt", {}),
    # DA-VPT configs/fgvc/vitb_cub200.yaml: guided blocks 10-11 of 12 (the last two), M = 10, 10 prompts
    # elsewhere, beta = lambda = 0.05, the released bias set, vpt_norm l2, mask true, dynamic_kmeans 1
    "davpt-fgvc@v2": (
        "da_vpt",
        {
            "guided_layers": [-2, -1],
            "num_proxy_prompts": 10,
            "prompt_length": 10,
            "beta": 0.05,
            "lam": 0.05,
            "bias_set": "full_released",
            "prompt_norm": "l2",
            "prompt_mask": True,
            "update_mapping_from_epoch": 2,
        },
    ),
    "ap-vit@v1": ("ap", {"variant": "add"}),
    "ap-cnn@v1": ("ap", {"variant": "add"}),
}


def test_every_recipe_version_has_an_expected_table() -> None:
    labels = {r.label for versions in RECIPE_VERSIONS.values() for r in versions.values()}
    assert labels == set(EXPECTED_TRAIN) == set(EXPECTED_DATA) == set(EXPECTED_METHOD) == set(EXPECTED_PROTOCOL)
    assert {r.label for r in RECIPES.values()} == {
        "ept-medfmc@v1",
        "vpt-vtab@v2",
        "vpt-fgvc@v2",
        "spt-fgvc@v2",
        "davpt-fgvc@v2",
        "ap-vit@v1",
        "ap-cnn@v1",
    }  # a bare name means the newest version


@pytest.mark.parametrize("label", sorted(EXPECTED_TRAIN))
def test_recipe_resolves_to_the_papers_values(label: str) -> None:
    method, options = EXPECTED_METHOD[label]
    base = {
        "backbone": {"name": "vit_tiny_patch16_224"},
        "method": {"name": method},
        "data": {"kind": "digits"},
    }
    raw = apply_recipe(base, label)
    config = RunConfig.model_validate(raw)
    recipe = get_recipe(label)
    assert config.train.recipe == recipe.label == label
    for field, value in EXPECTED_TRAIN[label].items():
        assert (
            getattr(config.train, field) == pytest.approx(value)
            if isinstance(value, float)
            else (getattr(config.train, field) == value)
        ), field
    mean, crop_pct, train_scale, hflip, augment, interpolation = EXPECTED_DATA[label]
    assert config.backbone.mean == mean and config.backbone.std == (IMAGENET_STD if mean else None)
    overlay = config.backbone.options.get("pretrained_cfg_overlay", {})
    assert overlay.get("crop_pct") == crop_pct and overlay.get("interpolation") == interpolation
    assert {k: v for k, v in config.backbone.options.items() if k != "pretrained_cfg_overlay"} == (
        EXPECTED_BACKBONE.get(label, {})
    )
    if train_scale is not None:
        assert list(config.data.train_scale) == pytest.approx(train_scale)
    if hflip is not None:
        assert config.data.hflip == hflip
    assert config.data.augment == augment
    assert config.method.options == options
    for key, value in EXPECTED_PROTOCOL[label].items():
        if key == "endo_select":
            assert recipe.protocol_value("select_metric")["endo"] == value
        else:
            assert recipe.protocol_value(key) == value
    if "seeds" not in EXPECTED_PROTOCOL[label]:
        assert recipe.protocol_value("seeds") is None
    assert all(source for _, _, source in describe(recipe))  # every value says where it comes from


@pytest.mark.parametrize(("label", "peak"), [("vpt-vtab@v2", 0.5), ("vpt-fgvc@v2", 0.5), ("vpt-vtab@v1", 0.125)])
def test_vpt_peak_lr_at_batch_128(label: str, peak: float) -> None:
    """VPT trains at base lr x batch / 256: base 1.0 at batch 128 peaks at 0.5 once the warm-up is over."""
    cfg = TrainConfig.model_validate(apply_recipe({"backbone": {"name": "x"}}, label)["train"])
    model = promptvit.wrap(build_tiny("vit_token", num_classes=3), "vpt", prompt_length=2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=3)
    seen = []
    for _ in range(cfg.epochs * 3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(seen) == pytest.approx(peak) and seen[0] == 0.0  # linear warm-up from 0, per epoch
    assert seen[int(cfg.warmup_epochs) * 3] == pytest.approx(peak)


def test_davpt_guided_layers_are_the_last_two_blocks_at_any_depth() -> None:
    options = get_recipe("davpt-fgvc").options_for("da_vpt")
    for depth in (2, 4):
        backbone = create_backbone(
            "vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=8, embed_dim=32, depth=depth, num_heads=2
        )
        assert promptvit.wrap(backbone, "da_vpt", **options).method.guided == [depth - 2, depth - 1]
    # ViT-B: blocks 10 and 11, the CUB config's proxy_prompt_start_idx / end_idx
    from promptvit.methods.lora import resolve_blocks

    assert resolve_blocks(options["guided_layers"], 12, "da_vpt") == [10, 11]


def test_protocols_run_their_recipes_seeds(tmp_path: Path) -> None:
    from promptvit.protocols.fgvc import FGVCProtocol
    from promptvit.protocols.vtab import VTABProtocol

    def seeds(protocol) -> list[int]:
        return [u.seed for u in protocol.units("final")]

    fgvc = dict(root=str(tmp_path), datasets=["cub"], layout="folder")
    assert seeds(FGVCProtocol(**fgvc)) == [0, 1, 2, 3, 4]  # vpt-fgvc@v2
    assert seeds(FGVCProtocol(**fgvc, recipe="spt-fgvc")) == [0, 1, 2]
    assert seeds(FGVCProtocol(**fgvc, recipe="davpt-fgvc")) == [0, 1, 2]
    assert seeds(FGVCProtocol(**fgvc, recipe="davpt-fgvc", seeds=[7])) == [7]  # what the user sets wins
    assert [u.seed for u in FGVCProtocol(**fgvc, recipe="spt-fgvc").units("search")] == [0]
    vtab = dict(root=str(tmp_path), tasks=["dtd"], layout="folders")
    assert seeds(VTABProtocol(**vtab)) == [42, 44, 82, 100, 800]
    assert seeds(VTABProtocol(**vtab, recipe="spt-fgvc")) == [0, 1, 2]
    assert [u.seed for u in VTABProtocol(**vtab).units("search")] == [42]


def test_user_values_win_and_another_method_gets_no_method_options() -> None:
    raw = {"backbone": {"name": "x"}, "method": {"name": "bias"}, "train": {"lr": 0.5}}
    resolved = apply_recipe(raw, "ept-medfmc")
    assert resolved["train"]["lr"] == 0.5 and resolved["train"]["batch_size"] == 4
    assert "options" not in resolved["method"]
    assert raw == {
        "backbone": {"name": "x"},
        "method": {"name": "bias"},
        "train": {"lr": 0.5},
    }  # not mutated
    # every recipe trains the linear baseline with its optimiser, as the papers do (not to convergence)
    for name in RECIPES:
        linear = apply_recipe({"backbone": {"name": "x"}, "method": {"name": "linear"}}, name)
        assert linear["method"]["options"] == {"solver": "sgd"}
    with pytest.raises(ConfigError, match="unknown recipe"):
        apply_recipe(raw, "ept")
    with pytest.raises(ConfigError, match="no version 'v9'; its versions: ept-medfmc@v1"):
        get_recipe("ept-medfmc@v9")
    assert get_recipe("ept-medfmc@v1").name == "ept-medfmc"
    assert get_recipe("vpt-vtab@v1").settings["train.lr"].value == 0.25  # an old label keeps its numbers


# Which group each tuned tensor lands in, by recipe rule. The categories come from the tensor's role:
# the classifier weight / bias, other 1-D tensors and norm parameters ("small"), everything else ("matrix":
# prompts, pads, deltas, LoRA / adapter weights, backbone weights).
RULE_GROUPS = {
    "all": {"head_weight": "decay", "head_bias": "decay", "small": "decay", "matrix": "decay"},
    "all_but_head_bias": {
        "head_weight": "decay",
        "head_bias": "no_decay",
        "small": "decay",
        "matrix": "decay",
    },
    "standard+head": {"head_weight": "head", "head_bias": "no_decay", "small": "no_decay", "matrix": "decay"},
}
RECIPE_RULE = {
    "ept-medfmc": "all",
    "vpt-vtab": "all_but_head_bias",
    "vpt-fgvc": "all_but_head_bias",
    "spt-fgvc": "standard+head",
    "davpt-fgvc": "standard+head",
    "ap-vit": "all",
    "ap-cnn": "all",
}
VIT_METHODS = ["linear", "bias", "norm", "lora", "adapter", "vp", "vpt", "spt", "da_vpt", "ept", "ap"]


def _category(name: str, parameter, head_prefix: str) -> str:
    if name.startswith(head_prefix):
        return "head_bias" if name.endswith("bias") else "head_weight"
    # DA-VPT+'s kv bias deltas are biases, one row per block: the code decays no bias
    if parameter.ndim <= 1 or "norm" in name or name.endswith(("cls_token", "pos_embed", "kv_bias_delta")):
        return "small"
    return "matrix"


@pytest.mark.parametrize("recipe", sorted(RECIPE_RULE))
def test_weight_decay_groups_of_every_method_under_each_recipe(recipe: str) -> None:
    raw = apply_recipe({"backbone": {"name": "x"}}, recipe)
    cfg = TrainConfig.model_validate(raw["train"])
    expected_rule = RULE_GROUPS[RECIPE_RULE[recipe]]
    methods = ["ap", "full", "linear"] if recipe == "ap-cnn" else [*VIT_METHODS, "da_vpt+"]
    for method in methods:
        kind = "resnet" if recipe == "ap-cnn" else "vit_token"
        options = {"cnn_input_size": [32, 32]} if kind == "resnet" and method == "ap" else {}
        if method == "da_vpt+":  # the released bias set, as davpt-fgvc@v2 runs it
            method, options = "da_vpt", {"bias_set": "full_released"}
        model = promptvit.wrap(build_tiny(kind, num_classes=3), method, **options)
        head = "backbone." + ("fc" if kind == "resnet" else "head") + "."
        groups = decay_group_of(model, cfg)
        params = dict(model.tuned_named_parameters())  # artifact keys, as decay_group_of names them
        assert groups and set(groups) == set(params)
        assert {id(p) for p in params.values()} == {id(p) for p in model.parameters() if p.requires_grad}
        for name, group in groups.items():
            assert group == expected_rule[_category(name, params[name], head)], (recipe, method, name, group)


def test_prompt_like_tensors_are_decayed_alike_without_a_recipe() -> None:
    """No recipe: prompts (VPT, SPT, EPT), VP's pad, AP's delta and LoRA factors all decay; bias deltas do not."""
    cfg = TrainConfig()
    seen = {}
    for method, options in [
        ("vpt", {}),
        ("ept", {}),
        ("vp", {"mode": "pad", "pad_size": 2}),
        ("ap", {}),
        ("lora", {}),
    ]:
        model = promptvit.wrap(build_tiny("vit_token", num_classes=3), method, **options)
        seen.update(
            {f"{method}:{n}": g for n, g in decay_group_of(model, cfg).items() if n.startswith("method.")}
        )
    assert len(seen) >= 5 and set(seen.values()) == {"decay"}, seen
    model = promptvit.wrap(build_tiny("vit_token", num_classes=3), "bias")
    groups = decay_group_of(model, cfg)
    assert {g for n, g in groups.items() if not n.startswith("backbone.head.")} == {"no_decay"}


def test_cli_recipe_is_recorded_in_metrics_and_config(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data")
    config = write_config(tmp_path, data, method="linear")
    result = invoke("train", "--config", str(config), "--recipe", "ept-medfmc", "--epochs", "1")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "linear-3shot-seed0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["recipe"] == "ept-medfmc@v1"
    assert (
        saved["train"]["weight_decay_rule"] == "all" and saved["train"]["optimizer"] == "adamw"
    )  # file wins
    metrics = json.loads((run / "metrics.json").read_text())
    assert "ept-medfmc@v1" in json.dumps(metrics)
    artifact = json.loads((run / "artifact" / "adapter_config.json").read_text())
    assert artifact["recipe"] == "ept-medfmc@v1"


def test_recipes_command_lists_and_explains() -> None:
    from typer.testing import CliRunner

    from promptvit.cli.app import app

    listing = CliRunner().invoke(app, ["recipes"], terminal_width=250)
    assert listing.exit_code == 0 and all(r.label in listing.output for r in RECIPES.values())
    one = CliRunner().invoke(app, ["recipes", "vpt-vtab"], terminal_width=250)
    assert one.exit_code == 0 and "kaiming_fan_out_prior" in one.output and "last_layer.bias" in one.output
    bad = CliRunner().invoke(app, ["recipes", "nope"])
    assert bad.exit_code != 0 and "unknown recipe" in bad.output
