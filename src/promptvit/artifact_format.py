"""The artifact's files: ``adapter_config.json`` + ``adapter_model.safetensors`` (tuned parameters only).

Writing and reading them needs only a model's public accessors (``tuned_state_dict``, ``geometry``, ...),
so this module sits below ``model.py`` (whose ``save_pretrained`` calls ``save_artifact``); rebuilding a
model from the files (``artifact.load``) sits above it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from promptvit._version import __version__
from promptvit.errors import ArtifactError
from promptvit.io import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from promptvit.model import PromptModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1


def save_artifact(model: PromptModel, directory: str | Path, **extra: Any) -> Path:
    """Write the tuned parameters and what is needed to rebuild the model; each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous().cpu() for name, tensor in model.tuned_state_dict().items()}
    geometry = model.geometry
    config = {
        "format_version": FORMAT_VERSION,
        "library": "promptvit",
        "library_version": __version__,
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


def read_artifact_weights(directory: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file's path and its tensors; ``ArtifactError`` if it is missing or unreadable."""
    weights_path = Path(directory) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path} not found; the artifact folder is incomplete")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(
            f"{weights_path} is not a readable safetensors file ({error}); re-save it"
        ) from error
    return weights_path, state


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
