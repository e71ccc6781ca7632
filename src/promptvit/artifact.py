"""Artifacts: rebuild a tuned model from its folder (``load``); the file format is ``artifact_format``."""

from __future__ import annotations

from pathlib import Path

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
from promptvit.errors import ArtifactError
from promptvit.model import PromptModel

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
    """Load an artifact (a folder, a run folder or ``hf-hub:ORG/NAME[@revision]``): the backbone is rebuilt
    from its record, or ``base_model`` (a plain timm model) is used. See :meth:`PromptModel.from_pretrained`."""
    return PromptModel.from_pretrained(directory, base_model, check_weights=check_weights)
