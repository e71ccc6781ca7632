"""The package's layers, top to bottom: what may import what.

A unit (a subpackage or a top-level module of promptvit) may import units of its own layer and of the layers
below it, never above. ``tests/test_layering.py`` enforces it on every import of the source, and
``python -m promptvit.docs`` prints it into docs/architecture.md. To add a module, put it in the row where it
belongs.
"""

from __future__ import annotations

LAYERS: list[tuple[str, list[str]]] = [
    ("documentation", ["docs"]),  # writes docs/ from the registries; nothing imports it
    ("package facade", ["__init__", "__main__"]),  # `import promptvit` re-exports; nothing inside imports it
    ("command line", ["cli"]),
    ("entry points", ["protocols", "demo"]),
    ("run pipeline", ["experiment"]),
    ("run config and run callbacks", ["run_config", "analysis_callbacks"]),
    ("uses of a model", ["train", "serving", "analysis", "export", "family_support"]),
    ("model and artifacts", ["model", "artifact", "cache"]),
    ("methods", ["methods"]),
    ("layers", ["layers"]),
    ("backbones", ["backbones"]),
    (
        "data and files (they know no model)",
        ["data", "evaluation", "io", "artifact_format", "hub", "recipes", "environment", "_version"],
    ),
    ("errors", ["errors", "validation", "layering"]),
]

#: units of one layer that must not import each other either
SIBLINGS_APART: list[set[str]] = [{"train", "serving", "analysis"}, {"protocols", "demo"}]
