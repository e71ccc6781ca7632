"""Artifacts: rebuild a tuned model from its folder (``load``); the file format is ``artifact_format``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from promptvit.artifact_format import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MAX_CLASSES,
    WEIGHTS_FILE,
    default_data_config,
    load_tuned_state,
    read_artifact_config,
    read_artifact_weights,
    resolve_artifact_dir,
    save_artifact,
    update_artifact_config,
)
from promptvit.backbones import Geometry, adapter_for, create_backbone, geometry_of
from promptvit.errors import ArtifactError, BackboneError
from promptvit.io import file_sha256
from promptvit.methods.base import get_method
from promptvit.model import PromptModel, wrap

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "MAX_CLASSES",
    "WEIGHTS_FILE",
    "ArtifactError",
    "default_data_config",
    "load",
    "load_tuned_state",
    "read_artifact_config",
    "read_artifact_weights",
    "resolve_artifact_dir",
    "save_artifact",
    "update_artifact_config",
]


def load(
    directory: str | Path,
    base_model: nn.Module | None = None,
    *,
    check_weights: bool = True,
) -> PromptModel:
    """Load an artifact onto ``base_model`` (a plain timm model), or rebuild the base from the config.

    The base must have the geometry the artifact was trained on and, unless ``check_weights=False``,
    the same pretrained weights (compared by fingerprint); otherwise ``ArtifactError`` says what differs.
    ``directory`` may be a Hub id, ``"hf-hub:ORG/NAME"`` (see :mod:`promptvit.hub`).
    """
    if isinstance(directory, str) and directory.startswith("hf-hub:"):
        from promptvit.hub import download

        directory = download(directory)
    directory = resolve_artifact_dir(directory)
    config = read_artifact_config(directory)
    weights_path, state = read_artifact_weights(directory)

    recorded = config.get("weights_sha256")
    if recorded is not None and recorded != file_sha256(weights_path):
        raise ArtifactError(
            f"{weights_path} is not the file {CONFIG_FILE} was saved with (its SHA-256 differs): the two "
            "files come from different saves, e.g. a save interrupted between them; save the artifact again"
        )
    if base_model is None:
        base_model = _rebuild_base(config, directory)
    saved = Geometry.from_dict(config["geometry"])
    adapter_for(base_model).reset_classifier(config["num_classes"])
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
