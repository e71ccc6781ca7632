"""One error base: every user-facing error is a PromptvitError, importable from where it was before."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import promptvit
from promptvit import errors

# (module that re-exports it, name, the standard-library base it keeps)
OLD_HOMES = [
    ("promptvit.methods.base", "ConfigError", ValueError),
    ("promptvit.cache", "CacheError", ValueError),
    ("promptvit.backbones", "BackboneError", ValueError),
    ("promptvit.data", "DataError", ValueError),
    ("promptvit.artifact", "ArtifactError", ValueError),
    ("promptvit.io", "OutputError", OSError),
    ("promptvit.train", "TrainingError", RuntimeError),
    ("promptvit.train", "ResumeError", RuntimeError),
    ("promptvit.protocols", "ProtocolError", ValueError),
    ("promptvit.export", "ExportError", ValueError),
    ("promptvit.hub", "HubError", ValueError),
]


@pytest.mark.parametrize(("module", "name", "std_base"), OLD_HOMES)
def test_each_error_is_the_one_class_under_the_base(module: str, name: str, std_base: type) -> None:
    cls = getattr(importlib.import_module(module), name)
    assert cls is getattr(errors, name)
    assert issubclass(cls, errors.PromptvitError) and issubclass(cls, std_base)
    assert str(cls("message names the file")) == "message names the file"


def test_every_error_class_in_the_package_is_listed() -> None:
    defined = {
        name
        for name, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, errors.PromptvitError) and obj is not errors.PromptvitError
    }
    assert defined == {name for _, name, _ in OLD_HOMES}
    assert promptvit.PromptvitError is errors.PromptvitError


def test_no_public_exception_class_is_defined_outside_errors_py() -> None:
    package = Path(errors.__file__).parent
    stray = []
    for path in package.rglob("*.py"):
        if path.name == "errors.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            if any(ast.unparse(base).endswith(("Error", "Exception")) for base in node.bases):
                stray.append(f"{path.relative_to(package)}: {node.name}")
    assert not stray, f"define these in promptvit/errors.py under PromptvitError: {stray}"
