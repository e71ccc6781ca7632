"""The artifact's files: ``adapter_config.json`` + ``adapter_model.safetensors`` (tuned parameters only).

The pair is consistent or refused: the config records the SHA-256 of the weights file it was saved with,
so weights from one save next to the config of another (a kill between the two writes) are an
``ArtifactError`` at load, never a silent mix. Every artifact carries ``class_names``, ``multilabel`` and
``data_config`` (defaults when the saver gave none), so one written from Python works with every CLI verb.

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
from promptvit.io import atomic_write, atomic_write_text, file_sha256

if TYPE_CHECKING:
    from promptvit.model import PromptModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1
MAX_CLASSES = 100_000

def default_data_config(model: PromptModel) -> dict[str, Any]:
    """Preprocessing from the backbone's timm config, at the input size the model was built for."""
    import timm

    data_config = dict(timm.data.resolve_data_config({}, model=model.backbone))
    data_config["input_size"] = (3, *model.geometry.img_size)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}


def save_artifact(
    model: PromptModel, directory: str | Path, *, adapter_name: str | None = None, **extra: Any
) -> Path:
    """Write the tuned tensors of one adapter (default: the active one) and what is needed to rebuild the
    model; the config last, naming the weights' hash, so an interrupted save is detected at load."""
    directory = Path(directory)  # created by the first atomic write (OutputError naming it if it cannot be)
    name = model.active_adapter if adapter_name is None else adapter_name
    method = model.adapters[name]
    state = {key: tensor.contiguous().cpu() for key, tensor in model.tuned_state_dict(name).items()}
    geometry = model.geometry
    config = {
        "format_version": FORMAT_VERSION,
        "library": "promptvit",
        "library_version": __version__,
        "method": method.name,
        "method_config": method.config.to_dict(),
        "base_model": model.source,
        "base_fingerprint": model.base_fingerprint,
        "geometry": geometry.to_dict(),
        "num_classes": method.num_classes,
        "input_size": [3, *geometry.img_size],
        "parameters": model.parameter_summary(name),
        "class_names": [f"class_{i}" for i in range(method.num_classes)],
        "multilabel": False,
        **extra,
    }
    if "data_config" not in config:
        config["data_config"] = default_data_config(model)
    if len(config["class_names"]) != method.num_classes:
        raise ArtifactError(f"{len(config['class_names'])} class names for {method.num_classes} outputs")
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    config["weights_sha256"] = file_sha256(directory / WEIGHTS_FILE)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, default=list) + "\n")
    return directory


def read_artifact(path: str | Path) -> tuple[Path, dict[str, Any], Path, dict[str, torch.Tensor]]:
    """``(folder, config, weights path, tensors)`` of an artifact folder or a run folder (its ``artifact/``);
    refuses weights that are not the file the config was saved with. (``hub.local_folder`` first turns a
    Hub address into a folder.)"""
    directory = resolve_artifact_dir(path)
    config = read_artifact_config(directory)
    weights_path, state = read_artifact_weights(directory)
    recorded = config.get("weights_sha256")
    if recorded is not None and recorded != file_sha256(weights_path):
        raise ArtifactError(
            f"{weights_path} is not the file {CONFIG_FILE} was saved with (its SHA-256 differs): the two "
            "files come from different saves, e.g. a save interrupted between them; save the artifact again"
        )
    return directory, config, weights_path, state


def geometry_differences(config: dict[str, Any], geometry: Any) -> str:
    """What differs between the geometry an artifact records and ``geometry`` (empty when nothing does)."""
    saved = config["geometry"]
    actual = geometry.to_dict()
    differences = [
        f"{key}: artifact {value} vs model {actual.get(key)}"
        for key, value in saved.items()
        if _plain(value) != _plain(actual.get(key))
    ]
    return ", ".join(differences)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def resolve_artifact_dir(path: str | Path) -> Path:
    """``path`` itself when it is an artifact folder, ``path/artifact`` when it is a run folder."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / "artifact" / CONFIG_FILE).is_file():
        return path / "artifact"
    return path


def read_artifact_config(directory: str | Path) -> dict[str, Any]:
    """The artifact's config (a run folder's ``artifact/`` is found), with defaults for older entries."""
    directory = resolve_artifact_dir(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        hint = (
            f" (found {pickles}: pickled weights are not loaded; re-save as safetensors)" if pickles else ""
        )
        raise ArtifactError(
            f"{path} not found: {directory} is neither an artifact folder nor a run folder with artifact/ "
            f"inside{hint}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(
            f"{path} is not valid JSON ({error}); the artifact is damaged, re-save it"
        ) from error
    if not isinstance(config, dict) or config.get("library") != "promptvit" or "method" not in config:
        raise ArtifactError(f"{path} was not written by promptvit (no 'library'/'method' entries)")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format {config['format_version']}; upgrade promptvit to read it")
    num_classes = config.get("num_classes")
    if (
        not isinstance(num_classes, int)
        or isinstance(num_classes, bool)
        or not 1 <= num_classes <= MAX_CLASSES
    ):
        raise ArtifactError(f"{path}: num_classes {num_classes!r} is not a class count (1..{MAX_CLASSES:,})")
    # Artifacts saved from Python before every save recorded them (one format however it was written).
    config.setdefault("class_names", [f"class_{i}" for i in range(num_classes)])
    config.setdefault("multilabel", False)
    names = config["class_names"]
    if not isinstance(names, list) or len(names) != num_classes or len(set(map(str, names))) != len(names):
        raise ArtifactError(f"{path}: class_names must list {num_classes} distinct names, got {names!r}")
    return config


def update_artifact_config(directory: str | Path, **entries: Any) -> Path:
    """Add or replace top-level entries of an artifact's ``adapter_config.json`` (atomically), e.g. the
    calibration and thresholds fitted on validation after training. The weights' hash stays valid."""
    directory = resolve_artifact_dir(directory)
    config = read_artifact_config(directory)
    config.update(entries)
    return atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, default=list) + "\n")


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


def load_tuned_state(model: PromptModel, state: dict, source: str, adapter_name: str | None = None) -> None:
    """Copy tuned tensors into one adapter of ``model`` (default: the active one); every tuned tensor must be
    present with the right shape."""
    expected = model.tuned_state_dict(adapter_name)
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
        if tensor.dtype.is_floating_point != expected[name].dtype.is_floating_point or (
            tensor.dtype == torch.bool
        ) != (expected[name].dtype == torch.bool):
            raise ArtifactError(
                f"{source}: '{name}' has dtype {tensor.dtype}, the model expects {expected[name].dtype}; "
                "the file was not written by save_pretrained, re-save it"
            )
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(
                f"{source}: '{name}' holds NaN or infinite values; the artifact is damaged (or training "
                "diverged), re-train or re-save it"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)
