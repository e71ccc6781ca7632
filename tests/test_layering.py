"""The import graph of ``src/promptvit`` points down only and has no cycles (read from the source, by AST).

Every ``import`` counts, including the ones inside functions (a lazy import is still a dependency);
only imports under ``if TYPE_CHECKING:`` are skipped, since they never run.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "promptvit"

# Top to bottom. A unit (a subpackage or a top-level module of promptvit) may import units of its own
# layer and of the layers below it, never above. To add a module, put it in the row where it belongs.
LAYERS: list[tuple[str, list[str]]] = [
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
    ("data and files", ["data", "evaluation", "io", "artifact_format", "hub", "recipes", "environment", "_version"]),  # data knows no model
    ("errors", ["errors", "validation"]),
]

# Units of one layer that must not import each other either.
SIBLINGS_APART: list[set[str]] = [{"train", "serving", "analysis"}, {"protocols", "demo"}]

# The modules that run training import the run pipeline (promptvit.experiment); every other module reads run
# configs and data from below it (run_config, backbones.spec, data.spec, environment).
RUNS_THE_PIPELINE = {"promptvit.cli.app", "promptvit.demo", "promptvit.protocols.runner"}

# Upward imports tolerated for now, each with the reason and who removes it.
TEMPORARY_ALLOWANCES: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _runtime_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """promptvit modules imported anywhere in ``tree`` except under ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from promptvit.pkg import submodule` imports the submodule too
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if candidate in MODULES:
                    found.add(candidate)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name == "promptvit" or name.startswith("promptvit.")}


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The module a dotted import name lands in (``promptvit.x.Y`` -> ``promptvit.x``)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imports = _runtime_imports(tree, module, path.name == "__init__.py")
        graph[module] = {_resolve(name) for name in imports} - {module}
    return graph


GRAPH = _graph()
LEVEL = {unit: index for index, (_, units) in enumerate(LAYERS) for unit in units}


def test_every_unit_has_a_layer() -> None:
    units = {_unit(module) for module in MODULES}
    missing = sorted(units - set(LEVEL))
    assert not missing, f"add {missing} to a row of LAYERS in {__file__}"
    stale = sorted(set(LEVEL) - units)
    assert not stale, f"LAYERS names units that no longer exist: {stale}"


def _violations() -> list[tuple[str, str, str, str]]:
    found = []
    for module, imports in GRAPH.items():
        for imported in imports:
            source, target = _unit(module), _unit(imported)
            if source == target:
                continue
            upward = LEVEL[target] < LEVEL[source]
            apart = any({source, target} <= group for group in SIBLINGS_APART)
            if upward or apart:
                found.append((source, target, module, imported))
    return found


def test_imports_point_down() -> None:
    bad = [
        f"{module} imports {imported} ({source} -> {target})"
        for source, target, module, imported in _violations()
        if (source, target) not in TEMPORARY_ALLOWANCES
    ]
    assert not bad, "imports against the layering (see LAYERS):\n" + "\n".join(sorted(bad))


def test_temporary_allowances_are_still_needed() -> None:
    used = {(source, target) for source, target, _, _ in _violations()}
    unused = sorted(set(TEMPORARY_ALLOWANCES) - used)
    assert not unused, f"delete these entries of TEMPORARY_ALLOWANCES, the imports are gone: {unused}"


def test_only_the_modules_that_run_training_import_the_pipeline() -> None:
    """A protocol that builds a spec or a split, or a CLI verb that reads a run config, does not import the
    pipeline: the way from ``promptvit train`` (or a sweep) to the tested run passes through the modules that
    run it and nothing else."""
    importers = {module for module, imports in GRAPH.items() if "promptvit.experiment" in imports}
    assert importers, "promptvit.experiment is imported by nobody: the detection is broken"
    extra = sorted(importers - RUNS_THE_PIPELINE)
    assert not extra, (
        f"{extra} import the run pipeline: take RunConfig from promptvit.run_config, data loading from "
        "promptvit.data.spec, backbone_init from promptvit.backbones.spec, environment from promptvit.environment"
    )


def _registers_an_adapter(path: Path) -> bool:
    """Whether the module defines a class decorated with ``@register_adapter(...)`` (a backbone family)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return any(
        isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("register_adapter")
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        for decorator in node.decorator_list
    )


FAMILY_MODULES = {
    module for module, path in MODULES.items() if _unit(module) == "backbones" and _registers_an_adapter(path)
}


def test_families_are_reached_through_the_adapter_interface_only() -> None:
    """Above ``backbones/`` (layers, methods, analysis, ...) a family is reached through ``adapter_for`` and the
    ``BackboneAdapter`` interface (``promptvit.backbones``, ``backbones.base``), never by importing its module:
    what a family computes differently (rotary positions, relative position bias) then cannot be bypassed."""
    assert {"promptvit.backbones.vit", "promptvit.backbones.eva"} <= FAMILY_MODULES  # the detection works
    bad = sorted(
        f"{module} imports {imported}"
        for module, imports in GRAPH.items()
        if _unit(module) != "backbones"
        for imported in imports & FAMILY_MODULES
    )
    assert not bad, "import the adapter interface (promptvit.backbones), not a family module:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def _without_allowances(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {
        module: {i for i in imports if (_unit(module), _unit(i)) not in TEMPORARY_ALLOWANCES}
        for module, imports in graph.items()
    }


def test_no_module_cycles() -> None:
    # a package's __init__ re-exporting its own modules is not a cycle between modules
    graph = {
        module: {i for i in imports if not module.startswith(i + ".")}
        for module, imports in _without_allowances(GRAPH).items()
    }
    assert not _cycles(graph), f"modules that import each other: {_cycles(graph)}"


def test_no_package_cycles() -> None:
    units: dict[str, set[str]] = defaultdict(set)
    for module, imports in _without_allowances(GRAPH).items():
        units[_unit(module)].update(_unit(i) for i in imports if _unit(i) != _unit(module))
    assert not _cycles(units), f"packages that import each other: {_cycles(units)}"


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder_finds_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert _cycles(graph) == expected


def test_lazy_imports_count_and_type_checking_ones_do_not() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from promptvit.model import PromptModel\n"
        "def f():\n    from promptvit.artifact import load\n"
    )
    assert _runtime_imports(ast.parse(source), "promptvit.x", False) == {"promptvit.artifact"}
