"""promptvit: visual prompt tuning and parameter-efficient fine-tuning for timm vision backbones."""

from promptvit._version import __version__  # noqa: F401
from promptvit.artifact import ArtifactError, load
from promptvit.backbones import BackboneError, Geometry, create_backbone, geometry_of
from promptvit.errors import PromptvitError
from promptvit.methods import (
    ConfigError,
    Method,
    MethodConfig,
    available_methods,
    get_method,
    register_method,
)
from promptvit.model import PromptModel, wrap

__all__ = [
    "ArtifactError",
    "BackboneError",
    "ConfigError",
    "Geometry",
    "Method",
    "MethodConfig",
    "PromptModel",
    "PromptvitError",
    "available_methods",
    "create_backbone",
    "geometry_of",
    "get_method",
    "load",
    "register_method",
    "wrap",
]
