"""Count the promptvit modules a run config passes through from ``promptvit train`` to the tested run.

Two counts, both printed with the modules they name:

* **touched**: a tiny ``promptvit train`` run (scikit-learn's digits, a 2-block ViT, VPT, one epoch, CPU) under
  ``sys.setprofile``; a module counts when one of its functions is called with the run config, one of its
  sections (``BackboneSpec``, ``MethodSpec``, ``DataSpec``, ``TrainConfig``, ``EvaluationConfig``) or the raw
  config mapping as an argument (``self`` included), or reads one of their fields.
* **import way**: the modules on an import path from ``promptvit.cli.app`` to the test pass
  (``promptvit.train.clinical``), in the import graph ``tests/test_layering.py`` reads from the source.

Run from the repository root: ``python benchmarks/config_way.py`` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

SECTIONS = {"RunConfig", "BackboneSpec", "MethodSpec", "DataSpec", "TrainConfig", "EvaluationConfig"}
TOP_KEYS = {"backbone", "method", "data", "train", "evaluation", "output_dir", "name"}


def _config_classes() -> list[type]:
    from pydantic import BaseModel

    import promptvit.cli.app  # noqa: F401  (imports every module that defines a section)

    found, todo = [], [BaseModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__name__ in SECTIONS and sub.__module__.startswith("promptvit"):
                found.append(sub)
    return found


def touched() -> dict[str, set[str]]:
    """Module -> what of the config its code was handed or read, on a tiny ``promptvit train`` run."""
    from pydantic import BaseModel
    from typer.testing import CliRunner

    from promptvit.cli.app import app

    src = str(ROOT / "src" / "promptvit")
    seen: dict[str, set[str]] = {}

    def kind_of(value: Any) -> str | None:
        if isinstance(value, BaseModel) and type(value).__name__ in SECTIONS:
            return type(value).__name__
        if isinstance(value, type) and issubclass(value, BaseModel) and value.__name__ in SECTIONS:
            return value.__name__  # a classmethod validator
        if isinstance(value, dict) and "backbone" in value and set(value) <= TOP_KEYS:
            return "raw config"
        return None

    def profile(frame: Any, event: str, arg: Any) -> None:
        code = frame.f_code
        if event != "call" or not code.co_filename.startswith(src):
            return
        for value in list(frame.f_locals.values())[: code.co_argcount + code.co_kwonlyargcount]:
            kind = kind_of(value)
            if kind:
                seen.setdefault(frame.f_globals["__name__"], set()).add(f"{code.co_name}({kind})")

    for cls in _config_classes():
        fields, original = set(cls.model_fields), cls.__getattribute__

        def getattribute(self: Any, name: str, _original: Any = original, _fields: set = fields) -> Any:
            if name in _fields:
                caller = sys._getframe(1)
                if caller.f_code.co_filename.startswith(src):
                    seen.setdefault(caller.f_globals["__name__"], set()).add(f"{type(self).__name__}.{name}")
            return _original(self, name)

        cls.__getattribute__ = getattribute
    with tempfile.TemporaryDirectory() as out:
        args = [
            "train", "--data-kind", "digits", "--data.classes", "[0,1]", "--shots", "2", "--method", "vpt",
            "--backbone", "vit_tiny_patch16_224",
            "--backbone.options", "{img_size: 32, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}",
            "--epochs", "1", "--train.batch-size", "4", "--train.progress", "false", "--out", out,
        ]  # fmt: skip
        sys.setprofile(profile)
        try:
            result = CliRunner().invoke(app, args)
        finally:
            sys.setprofile(None)
    if result.exit_code:
        raise SystemExit(f"the tiny run failed:\n{result.output}")
    return seen


def import_way(source: str = "promptvit.cli.app", target: str = "promptvit.train.clinical") -> set[str]:
    """Modules on an import path from ``source`` to ``target``."""
    from tests.test_layering import GRAPH

    def reach(start: str, graph: dict[str, set[str]]) -> set[str]:
        found, todo = {start}, [start]
        while todo:
            for module in graph.get(todo.pop(), ()):
                if module not in found:
                    found.add(module)
                    todo.append(module)
        return found

    importers: dict[str, set[str]] = {}
    for module, imports in GRAPH.items():
        for imported in imports:
            importers.setdefault(imported, set()).add(module)
    return reach(source, GRAPH) & reach(target, importers)


def main() -> None:
    seen = touched()
    for module in sorted(seen):
        print(f"{module}: {', '.join(sorted(seen[module]))}")
    print(f"touched: {len(seen)} modules\n")
    way = import_way()
    print("\n".join(sorted(way)))
    print(f"import way: {len(way)} modules")


if __name__ == "__main__":
    main()
