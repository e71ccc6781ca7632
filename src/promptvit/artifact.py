"""Artifacts: ``adapter_config.json`` + ``adapter_model.safetensors`` holding only the tuned parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from promptvit.backbones import BackboneError, Geometry, create_backbone, geometry_of
from promptvit.io import atomic_write, atomic_write_text
from promptvit.methods.base import get_method
from promptvit.model import PromptModel, wrap

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact is missing, unreadable, or does not fit the backbone it is loaded on."""


def _library_version() -> str:
    from promptvit import __version__

    return __version__


def save_artifact(model: PromptModel, directory: str | Path, **extra: Any) -> Path:
    """Write the tuned parameters and what is needed to rebuild the model; each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous().cpu() for name, tensor in model.tuned_state_dict().items()}
    geometry = model.geometry
    config = {
        "format_version": FORMAT_VERSION,
        "library": "promptvit",
        "library_version": _library_version(),
        "method": model.method.name,
        "method_config": model.config.to_dict(),
        "base_model": model.source,
        "base_fingerprint": model.base_fingerprint,
        "geometry": geometry.to_dict(),
        "num_classes": model.num_classes,
        "input_size": [3, *geometry.img_size],
        "parameters": model.parameter_summary(),
        **extra,
    }
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, default=list) + "\n")
    return directory


def update_artifact_config(directory: str | Path, **entries: Any) -> Path:
    """Add or replace top-level entries of an artifact's ``adapter_config.json`` (atomically), e.g. the
    calibration and thresholds fitted on validation after training."""
    directory = Path(directory)
    config = read_artifact_config(directory)
    config.update(entries)
    return atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, default=list) + "\n")


def read_artifact_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        hint = (
            f" (found {pickles}: pickled weights are not loaded; re-save as safetensors)" if pickles else ""
        )
        raise ArtifactError(f"{path} not found: not a promptvit artifact folder{hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(
            f"{path} is not valid JSON ({error}); the artifact is damaged, re-save it"
        ) from error
    if config.get("library") != "promptvit" or "method" not in config:
        raise ArtifactError(f"{path} was not written by promptvit (no 'library'/'method' entries)")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format {config['format_version']}; upgrade promptvit to read it")
    return config


def load(
    directory: str | Path,
    base_model: nn.Module | None = None,
    *,
    check_weights: bool = True,
) -> PromptModel:
    """Load an artifact onto ``base_model`` (a plain timm model), or rebuild the base from the config.

    The base must have the geometry the artifact was trained on and, unless ``check_weights=False``,
    the same pretrained weights (compared by fingerprint); otherwise ``ArtifactError`` says what differs.
    """
    directory = Path(directory)
    config = read_artifact_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path} not found; the artifact folder is incomplete")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(
            f"{weights_path} is not a readable safetensors file ({error}); re-save it"
        ) from error

    if base_model is None:
        base_model = _rebuild_base(config, directory)
    saved = Geometry.from_dict(config["geometry"])
    base_model.reset_classifier(config["num_classes"])
    actual = geometry_of(base_model)
    differences = {k: (v, getattr(actual, k)) for k, v in saved.to_dict().items() if v != getattr(actual, k)}
    if differences:
        described = ", ".join(f"{k}: artifact {a} vs model {b}" for k, (a, b) in differences.items())
        raise ArtifactError(f"{directory} was trained on another backbone geometry ({described})")

    method_cls = get_method(config["method"])
    method_config = method_cls.config_class.from_dict(config["method_config"], method=method_cls.name)
    model = wrap(base_model, method_config)
    if check_weights and config.get("base_fingerprint") != model.base_fingerprint:
        raise ArtifactError(
            f"{directory} was trained on other backbone weights (fingerprint {config.get('base_fingerprint')} "
            f"vs {model.base_fingerprint} of the given model, base '{config['base_model'].get('name')}'). "
            "Load it on the same pretrained backbone, or pass check_weights=False to override."
        )
    load_tuned_state(model, state, str(weights_path))
    return model


def load_tuned_state(model: PromptModel, state: dict, source: str) -> None:
    """Copy tuned tensors into ``model``; every tuned tensor must be present with the right shape."""
    expected = model.tuned_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{source} does not fit the method: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ArtifactError(
                f"{source}: '{name}' has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    own = model.state_dict()
    for name, tensor in state.items():
        own[name].copy_(tensor)


def _rebuild_base(config: dict[str, Any], directory: Path) -> nn.Module:
    source = config.get("base_model") or {}
    if not source.get("name"):
        raise ArtifactError(
            f"{directory} does not record a timm model name to rebuild its backbone; pass base_model=..."
        )
    weights = source.get("weights")
    if weights and not Path(weights).is_file():
        raise ArtifactError(
            f"{directory} was trained on local weights {weights}, which are not there; "
            "pass base_model=... built from that file"
        )
    try:
        return create_backbone(
            source["name"],
            pretrained=source.get("pretrained", False),
            weights=weights,
            init_seed=source.get("init_seed", 0),
            **source.get("kwargs", {}),
        )
    except BackboneError as error:
        raise ArtifactError(f"cannot rebuild the backbone of {directory}: {error}") from error
