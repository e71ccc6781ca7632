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
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from promptvit._version import __version__
from promptvit.errors import ArtifactError
from promptvit.evaluation.calibration import BIAS_BOUND, LOG_T_BOUNDS, SCALE_BOUNDS
from promptvit.io import atomic_write, atomic_write_text, file_sha256

if TYPE_CHECKING:
    from promptvit.model import PromptModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1
MAX_CLASSES = 100_000
NOT_A_PEFT_ADAPTER = "not a peft adapter but a promptvit artifact: load it with promptvit.load(...)"
#: the bounds calibration fits within (evaluation.calibration), 1 % wider for float round trips
TEMPERATURE_RANGE = (math.exp(LOG_T_BOUNDS[0]) * 0.99, math.exp(LOG_T_BOUNDS[1]) * 1.01)
PLATT_SCALE_RANGE = (SCALE_BOUNDS[0] * 0.99, SCALE_BOUNDS[1] * 1.01)
PLATT_BIAS_RANGE = (-BIAS_BOUND * 1.01, BIAS_BOUND * 1.01)

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
        # peft reads adapter_config.json by this key: a promptvit artifact then fails there with this sentence
        "peft_type": NOT_A_PEFT_ADAPTER,
        "method": method.name,
        "method_config": method.config.to_dict(),
        "base_model": model.source,
        "base_fingerprint": model.base_fingerprint,
        "geometry": geometry.to_dict(),
        "num_classes": method.num_classes,
        "parameters": model.parameter_summary(name),
        "class_names": [f"class_{i}" for i in range(method.num_classes)],
        "multilabel": False,
        **extra,
    }
    # What the saver gave, completed from the backbone's timm preprocessing at the size the model was built for.
    config["data_config"] = {**default_data_config(model), **config.get("data_config", {})}
    # One input size everywhere: the size the model is fed (for a CNN, what training resized to).
    config["input_size"] = list(config["data_config"]["input_size"])
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
    weights_path, state = read_artifact_weights(directory, config)
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
        peft = " (it is a peft adapter: load it with peft.PeftModel.from_pretrained)" if isinstance(
            config, dict
        ) and config.get("peft_type") not in (None, NOT_A_PEFT_ADAPTER) else ""
        raise ArtifactError(f"{path} was not written by promptvit (no 'library'/'method' entries){peft}")
    version = config.get("format_version", FORMAT_VERSION)
    if _is_int(version) and version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format {config['format_version']}; upgrade promptvit to read it")
    num_classes = config.get("num_classes")
    if not _is_int(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise ArtifactError(f"{path}: num_classes {num_classes!r} is not a class count (1..{MAX_CLASSES:,})")
    # Artifacts saved from Python before every save recorded them (one format however it was written).
    config.setdefault("class_names", [f"class_{i}" for i in range(num_classes)])
    config.setdefault("multilabel", False)
    names = config["class_names"]
    if not isinstance(names, list) or len(names) != num_classes or len(set(map(str, names))) != len(names):
        raise ArtifactError(f"{path}: class_names must list {num_classes} distinct names, got {names!r}")
    problem = _config_problem(config)
    if problem is not None:
        raise ArtifactError(f"{path} is damaged: {problem}; re-save the artifact (or train it again)")
    return config


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object, low: float = -math.inf, high: float = math.inf) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high


def _config_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with an artifact config's entries (types, ranges, finiteness), or None."""
    version = config.get("format_version", FORMAT_VERSION)
    if not _is_int(version) or version < 1:
        return f"format_version {version!r} is not a format number"
    if not isinstance(config["method"], str) or not isinstance(config.get("method_config", {}), dict):
        return "'method' must be a name and 'method_config' an object"
    for key in ("geometry", "base_model"):
        if not isinstance(config.get(key), dict):
            return f"the '{key}' entry is missing or not an object"
    if not isinstance(config.get("base_fingerprint"), str):
        return "the 'base_fingerprint' entry is missing or not a string"
    problem = _base_model_problem(config["base_model"])
    if problem is not None:
        return problem
    if not isinstance(config["multilabel"], bool):
        return f"multilabel must be true or false, got {config['multilabel']!r}"
    if not all(isinstance(name, (str, int)) and not isinstance(name, bool) for name in config["class_names"]):
        return "class_names must be strings"
    for key in ("input_size",):
        if key in config and not _is_size(config[key]):
            return f"{key} must be [3, height, width] with positive sizes, got {config[key]!r}"
    if "data_config" in config:
        problem = _data_config_problem(config["data_config"])
        if problem is not None:
            return problem
    sha = config.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        return f"weights_sha256 {sha!r} is not a SHA-256"
    problem = _calibration_problem(config.get("calibration"), len(config["class_names"]))
    if problem is not None:
        return problem
    return _thresholds_problem(config.get("thresholds"), [str(n) for n in config["class_names"]])


def _is_size(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and value[0] == 3
        and all(_is_int(v) and 0 < v <= 100_000 for v in value)
    )


def _base_model_problem(base: dict[str, Any]) -> str | None:
    types = {
        "name": (str, type(None)),
        "pretrained": (bool,),
        "weights": (str, type(None)),
        "kwargs": (dict,),
        "origin": (str,),
        "weights_loader": (str,),
        "hub_id": (str, type(None)),
        "license": (str, type(None)),
        "problem": (str, type(None)),
    }
    for key, allowed in types.items():
        if key in base and not isinstance(base[key], allowed):
            return f"base_model.{key} has the wrong type ({type(base[key]).__name__})"
    seed = base.get("init_seed", 0)
    if seed is not None and not _is_int(seed):
        return f"base_model.init_seed {seed!r} is not an integer"
    if base.get("origin", "hub") not in ("hub", "file", "random", "unknown"):
        return f"base_model.origin {base['origin']!r} is not hub, file, random or unknown"
    if base.get("weights_loader", "timm") not in ("timm", "promptvit"):
        return f"base_model.weights_loader {base['weights_loader']!r} is not timm or promptvit"
    return None


def _data_config_problem(data: object) -> str | None:
    if not isinstance(data, dict):
        return "data_config must be an object"
    if not _is_size(data.get("input_size")):
        return f"data_config.input_size must be [3, height, width], got {data.get('input_size')!r}"
    for key, low in (("mean", -math.inf), ("std", 1e-6)):
        value = data.get(key)
        if value is not None and not (
            isinstance(value, list) and len(value) in (1, 3) and all(_is_number(v, low, 1e6) for v in value)
        ):
            return f"data_config.{key} must be 3 finite numbers{' > 0' if low > 0 else ''}, got {value!r}"
    crop = data.get("crop_pct")
    if crop is not None and not _is_number(crop, 1e-3, 10.0):
        return f"data_config.crop_pct must be a positive fraction, got {crop!r}"
    for key in ("interpolation", "crop_mode"):
        if key in data and not isinstance(data[key], str):
            return f"data_config.{key} must be a name, got {data[key]!r}"
    return None


def _calibration_problem(calibration: object, num_classes: int) -> str | None:
    if calibration is None:
        return None
    if not isinstance(calibration, dict):
        return "the calibration entry must be an object"
    kind = calibration.get("kind")
    if kind == "temperature":
        if not _is_number(calibration.get("temperature"), *TEMPERATURE_RANGE):
            return (
                f"calibration temperature {calibration.get('temperature')!r} is outside "
                f"{TEMPERATURE_RANGE[0]:.3g}..{TEMPERATURE_RANGE[1]:.3g}, the range calibration fits in"
            )
    elif kind == "platt":
        for key, (low, high) in (("scale", PLATT_SCALE_RANGE), ("bias", PLATT_BIAS_RANGE)):
            values = calibration.get(key)
            if not (isinstance(values, list) and len(values) == num_classes and all(_is_number(v, low, high) for v in values)):
                return f"calibration {key} must be {num_classes} numbers in {low:.3g}..{high:.3g}, got {values!r}"
    else:
        return f"calibration kind must be 'temperature' or 'platt', got {kind!r}"
    for key in ("val_nll_before", "val_nll_after"):
        if calibration.get(key) is not None and not _is_number(calibration[key], 0.0):
            return f"calibration {key} {calibration[key]!r} is not a finite loss"
    return None


def _thresholds_problem(thresholds: object, class_names: list[str]) -> str | None:
    if thresholds is None:
        return None
    classes = thresholds.get("classes") if isinstance(thresholds, dict) else None
    if not isinstance(classes, dict) or not classes:
        return "the thresholds entry must name a threshold per class"
    for name, entry in classes.items():
        if name not in class_names:
            return f"thresholds name the class {name!r}, which the artifact does not have"
        value = entry.get("threshold") if isinstance(entry, dict) else None
        if not _is_number(value, 0.0, 1.0):
            return f"the threshold of class {name!r} must be a probability in 0..1, got {value!r}"
    target = thresholds.get("target_sensitivity")
    if target is not None and not _is_number(target, 0.0, 1.0):
        return f"thresholds target_sensitivity {target!r} is not in 0..1"
    return None


def update_artifact_config(directory: str | Path, **entries: Any) -> Path:
    """Add or replace top-level entries of an artifact's ``adapter_config.json`` (atomically), e.g. the
    calibration and thresholds fitted on validation after training. The weights' hash stays valid."""
    directory = resolve_artifact_dir(directory)
    config = read_artifact_config(directory)
    config.update(entries)
    return atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, default=list) + "\n")


def read_artifact_weights(
    directory: str | Path, config: dict[str, Any] | None = None
) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file's path and its tensors; ``ArtifactError`` if it is missing, unreadable, or not the file
    ``config`` was saved with (its recorded SHA-256)."""
    weights_path = Path(directory) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path} not found; the artifact folder is incomplete")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(
            f"{weights_path} is not a readable safetensors file ({error}); re-save it"
        ) from error
    recorded = (config or {}).get("weights_sha256")
    if recorded is not None and recorded != file_sha256(weights_path):
        raise ArtifactError(
            f"{weights_path} is not the file {CONFIG_FILE} was saved with (its SHA-256 differs): the two "
            "files come from different saves, e.g. a save interrupted between them; save the artifact again"
        )
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
