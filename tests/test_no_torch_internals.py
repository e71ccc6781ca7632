"""``src/`` changes models only through public torch: no private hook dictionaries, no instance ``forward``.

Hooks are kept by their handles (``RemovableHandle.remove`` undoes them, in deep copies too) and blocks run
in the model's own block loop, so no code needs torch's private hook dictionaries or a rebound ``forward``.
Read from the source by AST, so comments and strings do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "promptvit"
#: torch's private per-module hook dictionaries
PRIVATE_HOOKS = {
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
}


def _offences(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_HOOKS:
            found.append(f"line {node.lineno}: reads .{node.attr}")
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "forward":
                    found.append(f"line {node.lineno}: assigns .forward")
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) in ("setattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == "forward"
        ):
            found.append(f"line {node.lineno}: {node.func.id}(..., 'forward')")
        if isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr == "forward":
                    found.append(f"line {node.lineno}: deletes .forward")
    return found


def test_no_module_reads_private_hook_dictionaries_or_rebinds_forward() -> None:
    offences = {
        str(path.relative_to(SRC)): found
        for path in sorted(SRC.rglob("*.py"))
        if (found := _offences(path.read_text(encoding="utf-8")))
    }
    assert not offences, offences


def test_the_check_finds_what_it_forbids() -> None:
    bad = "m._forward_pre_hooks.pop(1)\nblock.forward = f\nsetattr(block, 'forward', f)\ndel block.forward\n"
    assert len(_offences(bad)) == 4
    assert not _offences("handle = m.register_forward_hook(f)\nhandle.remove()\n# m._forward_hooks\n")
