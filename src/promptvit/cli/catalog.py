"""What ``promptvit methods`` prints: every registered method with its options, quick to show again.

Reading the registry imports torch (seconds); the rows are therefore kept in a small JSON file in the user's
cache folder, keyed by promptvit's version and the size and modification time of every source file of the
package, so any change to the code rebuilds them. Set ``PROMPTVIT_CACHE_DIR`` to move that folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from promptvit._version import __version__


def cache_folder() -> Path:
    if os.environ.get("PROMPTVIT_CACHE_DIR"):
        return Path(os.environ["PROMPTVIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promptvit"


def _sources_key() -> str:
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(package.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(package)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def yaml_value(value: Any) -> str:
    """A default as the command line reads it back (YAML, no spaces): ``[q,v]``, ``null``, ``0.1``."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(yaml_value(item) for item in value) + "]"
    return yaml.safe_dump(value, width=10**6).strip().removesuffix("...").strip()


def _rows_from_registry() -> list[dict[str, Any]]:
    from promptvit.methods import available_methods, get_method

    rows = []
    for name in available_methods():
        cls = get_method(name)
        options = {}
        for field in dataclasses.fields(cls.config_class):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            options[field.name] = yaml_value(default)
        rows.append({"name": name, "backbones": list(cls.supported_kinds), "paper": cls.paper, "options": options})
    return rows


def method_rows() -> list[dict[str, Any]]:
    """Name, backbone kinds, paper and ``{option: default}`` of every registered method (cached)."""
    path = cache_folder() / f"methods-{_sources_key()}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    rows = _rows_from_registry()
    try:
        from promptvit.io import atomic_write_text

        atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
    except OSError:  # a read-only home: show the list anyway, just not faster next time
        pass
    return rows


def wrap_tokens(tokens: list[str], width: int, indent: str) -> list[str]:
    """Greedy wrap that breaks only between tokens (an option name and its value are never split)."""
    lines, line = [], indent
    for token in tokens:
        if line.strip() and len(line) + 1 + len(token) > width:
            lines.append(line)
            line = indent
        line += ("" if not line.strip() else " ") + token
    if line.strip():
        lines.append(line)
    return lines


def render(rows: list[dict[str, Any]], width: int) -> str:
    """Plain text, ``width`` columns: a line per method, then its options as ``--method.name default``."""
    usage = "Use: promptvit train --method NAME --method.OPTION VALUE (defaults shown)"
    lines = wrap_tokens(usage.split(" "), width, "")
    lines.append("")
    for row in rows:
        heading = f"{row['name']} ({'/'.join(row['backbones'])}): {row['paper']}"
        lines += wrap_tokens(heading.split(), width, "")
        tokens = [f"--method.{k.replace('_', '-')} {v}" + "," for k, v in row["options"].items()]
        if tokens:
            tokens[-1] = tokens[-1].removesuffix(",")
        lines += wrap_tokens(tokens, width, "    ") or ["    (no options)"]
    return "\n".join(lines)
