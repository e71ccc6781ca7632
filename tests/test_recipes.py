"""Recipes: each resolves to the values the paper's code sets (a table per recipe), wd groups per method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import promptvit
from promptvit.experiment import RunConfig
from promptvit.methods.base import ConfigError
from promptvit.recipes import IMAGENET_MEAN, IMAGENET_STD, RECIPES, apply_recipe, describe, get_recipe
from promptvit.train import TrainConfig
from promptvit.train.optim import decay_group_of
from tests.cli.test_cli import invoke, write_config, write_image_folder
from tests.conftest import build_tiny

# Expected train values per recipe, written out from the papers' code (docs/recipes.md), not from recipes.py.
EXPECTED_TRAIN = {
    "ept-medfmc": dict(
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
    "vpt-vtab": dict(
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
    ),
    "vpt-fgvc": dict(
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
    ),
    "spt-fgvc": dict(
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
    ),
    "davpt-fgvc": dict(
        optimizer="adamw",
        lr=5e-4,
        scale_lr=False,
        weight_decay=0.05,
        weight_decay_rule="standard",
        head_weight_decay=5.0,
        schedule_unit="step",
        warmup_epochs=10,
        min_lr=1e-9,
        epochs=100,
        batch_size=32,
        head_init="trunc_normal_0.02",
        precision="fp16",
    ),
    "ap-vit": dict(optimizer="adamw", lr=0.01, weight_decay=0.0, epochs=100, batch_size=128),
    "ap-cnn": dict(optimizer="adamw", lr=0.001, weight_decay=0.0, epochs=100, batch_size=128),
}
# Preprocessing: (mean/std, eval crop_pct, train_scale, hflip, augment); None = promptvit's default kept.
EXPECTED_DATA = {
    "ept-medfmc": (IMAGENET_MEAN, 1.0, [0.08, 1.0], True, True),
    "vpt-vtab": (IMAGENET_MEAN, 1.0, None, None, False),
    "vpt-fgvc": (IMAGENET_MEAN, 0.875, [0.765625, 0.765625], True, True),
    "spt-fgvc": (IMAGENET_MEAN, 0.875, [0.08, 1.0], True, True),
    "davpt-fgvc": (IMAGENET_MEAN, 0.875, [0.08, 1.0], True, True),
    "ap-vit": (None, None, None, None, True),
    "ap-cnn": (None, None, None, None, True),
}
EXPECTED_PROTOCOL = {
    "ept-medfmc": {"seeds": [0, 1, 2, 3], "eval_resize": "direct", "endo_select": "auc"},
    "vpt-vtab": {"seeds": [42, 44, 82, 100, 800], "epoch_selection": "last", "eval_resize": "direct"},
    "vpt-fgvc": {"seeds": [42, 44, 82, 100, 800], "epoch_selection": "last"},
}
EXPECTED_METHOD = {
    "ept-medfmc": ("ept", {"prompt_length": 100, "init_std": 0.02, "way": "pure_cat"}),
    "vpt-vtab": ("vpt", {"dropout": 0.1}),
    "vpt-fgvc": ("vpt", {"dropout": 0.1}),
    "spt-fgvc": ("spt", {"prompt_length": 20, "deep": True, "sampler": "random"}),
    "davpt-fgvc": ("da_vpt", {}),
    "ap-vit": ("ap", {"variant": "add"}),
    "ap-cnn": ("ap", {"variant": "add"}),
}


def test_every_recipe_has_an_expected_table() -> None:
    assert set(RECIPES) == set(EXPECTED_TRAIN) == set(EXPECTED_DATA) == set(EXPECTED_METHOD)


@pytest.mark.parametrize("name", sorted(EXPECTED_TRAIN))
def test_recipe_resolves_to_the_papers_values(name: str) -> None:
    method, options = EXPECTED_METHOD[name]
    base = {
        "backbone": {"name": "vit_tiny_patch16_224"},
        "method": {"name": method},
        "data": {"kind": "digits"},
    }
    raw = apply_recipe(base, name)
    config = RunConfig.model_validate(raw)
    recipe = get_recipe(name)
    assert config.train.recipe == recipe.label == f"{name}@v1"
    for field, value in EXPECTED_TRAIN[name].items():
        assert (
            getattr(config.train, field) == pytest.approx(value)
            if isinstance(value, float)
            else (getattr(config.train, field) == value)
        ), field
    mean, crop_pct, train_scale, hflip, augment = EXPECTED_DATA[name]
    assert config.backbone.mean == mean and config.backbone.std == (IMAGENET_STD if mean else None)
    overlay = config.backbone.options.get("pretrained_cfg_overlay", {})
    assert overlay.get("crop_pct") == crop_pct
    if train_scale is not None:
        assert list(config.data.train_scale) == pytest.approx(train_scale)
    if hflip is not None:
        assert config.data.hflip == hflip
    assert config.data.augment == augment
    for option, value in options.items():
        assert config.method.options[option] == value
    for key, value in EXPECTED_PROTOCOL.get(name, {}).items():
        if key == "endo_select":
            assert recipe.protocol_value("select_metric")["endo"] == value
        else:
            assert recipe.protocol_value(key) == value
    assert all(source for _, _, source in describe(recipe))  # every value says where it comes from


def test_user_values_win_and_another_method_gets_no_method_options() -> None:
    raw = {"backbone": {"name": "x"}, "method": {"name": "linear"}, "train": {"lr": 0.5}}
    resolved = apply_recipe(raw, "ept-medfmc")
    assert resolved["train"]["lr"] == 0.5 and resolved["train"]["batch_size"] == 4
    assert "options" not in resolved["method"]
    assert raw == {
        "backbone": {"name": "x"},
        "method": {"name": "linear"},
        "train": {"lr": 0.5},
    }  # not mutated
    with pytest.raises(ConfigError, match="unknown recipe"):
        apply_recipe(raw, "ept")
    with pytest.raises(ConfigError, match="v1"):
        get_recipe("ept-medfmc@v9")
    assert get_recipe("ept-medfmc@v1").name == "ept-medfmc"


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
    if parameter.ndim <= 1 or "norm" in name or name.endswith(("cls_token", "pos_embed")):
        return "small"
    return "matrix"


@pytest.mark.parametrize("recipe", sorted(RECIPE_RULE))
def test_weight_decay_groups_of_every_method_under_each_recipe(recipe: str) -> None:
    raw = apply_recipe({"backbone": {"name": "x"}}, recipe)
    cfg = TrainConfig.model_validate(raw["train"])
    expected_rule = RULE_GROUPS[RECIPE_RULE[recipe]]
    methods = ["ap", "full", "linear"] if recipe == "ap-cnn" else VIT_METHODS
    for method in methods:
        kind = "resnet" if recipe == "ap-cnn" else "vit_token"
        options = {"cnn_input_size": [32, 32]} if kind == "resnet" and method == "ap" else {}
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
