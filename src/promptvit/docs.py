"""The parts of docs/architecture.md that come from the code: the layer list and the backbone families.

``python -m promptvit.docs`` rewrites every section between ``<!-- generated: NAME -->`` and
``<!-- end generated: NAME -->`` from the layer list (:mod:`promptvit.layering`, each unit described by the
first sentence of its docstring) and the registries (every family adapter, its timm classes and tiny builds,
and the methods whose ``supports()`` accepts it). ``--check`` only says whether the file is up to date;
tests/test_docs.py does the same, so the document cannot go stale. A top-level tool: nothing imports it.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

from promptvit.layering import LAYERS

PACKAGE = Path(__file__).resolve().parent
#: docs/architecture.md of the source checkout this module lives in
ARCHITECTURE = PACKAGE.parents[1] / "docs" / "architecture.md"


def _unit_path(unit: str) -> Path:
    folder = PACKAGE / unit
    return folder / "__init__.py" if folder.is_dir() else PACKAGE / f"{unit}.py"


def _summary(path: Path) -> str:
    """The first sentence of a module's docstring, on one line."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    match = re.match(r"(.+?[^.]\.)(\s+[A-Z]|$)", paragraph)  # not at "..." nor before a lower-case word
    return (match.group(1) if match else paragraph).replace("|", "\\|")


def layers_table() -> str:
    """One row per unit, top to bottom; a unit imports only units of its own row group and those below."""
    rows = ["| layer | unit | what it is |", "|---|---|---|"]
    for layer, units in LAYERS:
        for index, unit in enumerate(units):
            path = _unit_path(unit)
            name = f"{unit}/" if path.name == "__init__.py" and unit != "__init__" else f"{unit}.py"
            rows.append(f"| {layer if index == 0 else ''} | `{name}` | {_summary(path)} |")
    return "\n".join(rows)


def _cell(supported: list[str], methods: list[str]) -> str:
    if supported == methods:
        return "all"
    missing = [m for m in methods if m not in supported]
    if len(supported) >= len(missing):
        return "all but " + ", ".join(f"`{m}`" for m in missing)
    return ", ".join(f"`{m}`" for m in supported) or "none"


def families_table() -> str:
    """One row per registered family: its module, kind, timm classes, tiny builds, and the methods that declare
    (``Method.supports``) that they attach to it, per build where its builds differ."""
    import timm
    import torch

    from promptvit.backbones import adapter_for, create_backbone, registered_adapters
    from promptvit.methods import available_methods, get_method

    methods = available_methods()
    classes: dict[type, list[str]] = {}
    for model_class, adapter in registered_adapters().items():
        # an adapter registered for torch's Module is the fallback of every timm model without a family
        name = "any other timm model" if model_class is torch.nn.Module else model_class.__name__
        classes.setdefault(adapter, []).append(name)
    rows = [
        "| family | module | kind | timm classes | tiny builds | methods supported |",
        "|---|---|---|---|---|---|",
    ]
    for adapter, names in classes.items():
        module = Path(inspect.getsourcefile(adapter) or "").resolve()
        where = module.relative_to(PACKAGE).as_posix() if module.is_relative_to(PACKAGE) else module.name
        builds = ", ".join(f"`{name}` ({arch})" for name, (arch, _, _) in adapter.tiny_builds.items())
        support: dict[str, str] = {}
        for name, (arch, options, _) in adapter.tiny_builds.items():
            if timm.is_model(arch):  # an older timm lacks some architectures
                family = adapter_for(create_backbone(arch, num_classes=2, **options))
                support[name] = _cell([m for m in methods if get_method(m).supports(family)], methods)
        if len(set(support.values())) == 1:
            cell = next(iter(support.values()))
        else:
            cell = "; ".join(f"`{name}`: {text}" for name, text in support.items()) or "(no build in this timm)"
        rows.append(
            f"| {adapter.family} | `{where}` | {adapter.kind} | {', '.join(sorted(names))} | {builds} | {cell} |"
        )
    return "\n".join(rows)


SECTIONS: dict[str, Callable[[], str]] = {"layers": layers_table, "families": families_table}


def render(text: str, path: Path) -> str:
    """``text`` with every generated section rewritten; a ``ValueError`` names a section without its markers."""
    for name, make in SECTIONS.items():
        begin, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
        pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if len(pattern.findall(text)) != 1:
            raise ValueError(
                f"{path} needs the section '{name}' once, between the lines {begin} and {end}; add them where the "
                "section belongs"
            )
        section = f"{begin}\n{make()}\n{end}"
        text = pattern.sub(lambda _, section=section: section, text)  # a function: no escapes read in the table
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m promptvit.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=ARCHITECTURE, help="the file (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    path: Path = args.path
    if not path.is_file():
        print(f"promptvit.docs: {path} is no file; pass the path of docs/architecture.md", file=sys.stderr)
        return 2
    try:
        text = path.read_text(encoding="utf-8")
        updated = render(text, path)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        print(f"promptvit.docs: {error}", file=sys.stderr)
        return 2
    if updated == text:
        print(f"{path} is up to date")
        return 0
    if args.check:
        print(f"{path} is out of date: run python -m promptvit.docs", file=sys.stderr)
        return 1
    from promptvit.io import atomic_write_text

    atomic_write_text(path, updated)
    print(f"rewrote the generated sections of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
