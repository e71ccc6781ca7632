"""The offline demo: pretrain a small ViT on digits 0-4, then adapt it few-shot to digits 5-9 per method."""

from __future__ import annotations

import copy
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from promptvit.artifact import load
from promptvit.backbones import classifier_name
from promptvit.experiment import run_experiment
from promptvit.io import atomic_write
from promptvit.run_config import RunConfig


def demo_config() -> dict[str, Any]:
    text = (resources.files("promptvit") / "configs" / "demo.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def pretrain_backbone(raw: dict[str, Any], out: Path) -> Path:
    """Stage 1: full training from scratch on the source classes; returns the backbone weights file."""
    weights = out / "pretrained" / "backbone.safetensors"
    if weights.is_file():
        return weights
    stage = raw["pretrain"]
    config = copy.deepcopy({k: v for k, v in raw.items() if k != "pretrain"})
    config["method"] = {"name": stage["method"]}
    config["data"].update(classes=stage["classes"], shots=None)
    config["train"].update(epochs=stage["epochs"], lr=stage["lr"])
    config.update(output_dir=str(out), name="pretrained")
    run = RunConfig.model_validate(config)
    run_experiment(run)
    backbone = load(run.run_dir() / "artifact").backbone
    head = classifier_name(backbone) + "."
    # The source-task head is dropped: each stage-2 run gets a new one for its own classes.
    state = {k: v.contiguous() for k, v in backbone.state_dict().items() if not k.startswith(head)}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    return weights


def run_demo(
    out: str | Path,
    methods: list[str],
    *,
    epochs: int | None = None,
    shots: int | None = None,
    on_done: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Stage 2 for each method on the pretrained backbone; returns each run's metrics."""
    out = Path(out)
    raw = demo_config()
    weights = pretrain_backbone(raw, out)
    results = []
    for method in methods:
        config = copy.deepcopy({k: v for k, v in raw.items() if k != "pretrain"})
        config["backbone"]["weights"] = str(weights)
        config["method"] = {"name": method}
        if epochs is not None:
            config["train"]["epochs"] = epochs
        if shots is not None:
            config["data"]["shots"] = shots
        config.update(output_dir=str(out), name=method)
        metrics = run_experiment(RunConfig.model_validate(config))
        results.append({"method": method, **metrics})
        if on_done:
            on_done(method, metrics)
    return results
