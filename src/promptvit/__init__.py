"""promptvit: visual prompt tuning and parameter-efficient fine-tuning for timm vision backbones.

The public names below are imported on first use (PEP 562), so that ``import promptvit.cli`` and
``promptvit --help`` do not wait for torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

from promptvit._version import __version__  # noqa: F401

# public name -> module that defines it
_EXPORTS = {
    "ArtifactError": "promptvit.artifact",
    "load": "promptvit.artifact",
    "BackboneError": "promptvit.backbones",
    "PromptvitError": "promptvit.errors",
    "Geometry": "promptvit.backbones",
    "create_backbone": "promptvit.backbones",
    "geometry_of": "promptvit.backbones",
    "ConfigError": "promptvit.methods",
    "Method": "promptvit.methods",
    "MethodConfig": "promptvit.methods",
    "available_methods": "promptvit.methods",
    "get_method": "promptvit.methods",
    "register_method": "promptvit.methods",
    "unregister_method": "promptvit.methods",
    "PromptModel": "promptvit.model",
    "wrap": "promptvit.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'promptvit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

