"""Which method runs on which backbone family: every registered method tried on every family's tiny builds.

The answer is computed, not written down: each family adapter carries small random-init builds with its
architecture options (``BackboneAdapter.tiny_builds``); a method counts as supported on a family when it wraps
and runs a forward pass on every one of them, and otherwise the ``ConfigError`` it raised is the reason.
``promptvit backbones`` prints this table; the README's family table is its ``--markdown`` output.
"""

from __future__ import annotations

import copy
import dataclasses

import timm
import torch

from promptvit.backbones import (
    BackboneAdapter,
    adapter_for,
    create_backbone,
    geometry_of,
    registered_adapters,
)
from promptvit.methods import available_methods, get_method
from promptvit.methods.base import ConfigError
from promptvit.model import wrap

SUPPORTED = "✓"


@dataclasses.dataclass(frozen=True)
class FamilySupport:
    family: str
    timm_classes: tuple[str, ...]
    builds: tuple[str, ...]  # timm model names of the tiny builds tried
    methods: dict[str, str]  # method -> SUPPORTED or the reason it is refused


def _try(method: str, base: torch.nn.Module, size: int) -> str:
    cls = get_method(method)
    kind = geometry_of(base).kind
    adapter = adapter_for(base)
    if not cls.supports(adapter):  # the same reason for every such method: one note in the table
        why = adapter.kind_note or f"this family is a {kind} (stages of feature maps)"
        return f"needs a {' or '.join(cls.supported_kinds)} backbone; {why}"
    try:
        model = wrap(copy.deepcopy(base), method, num_classes=2, **cls.test_options).eval()
    except ConfigError as error:
        return str(error)
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return SUPPORTED


def _summary(outcomes: dict[str, str]) -> str:
    """One cell: ✓ if every build runs, else the reason (naming the builds it applies to when some run)."""
    refused = {name: reason for name, reason in outcomes.items() if reason != SUPPORTED}
    if not refused:
        return SUPPORTED
    reason = next(iter(refused.values()))
    if len(refused) == len(outcomes):
        return reason
    return f"{SUPPORTED} except {', '.join(refused)}: {reason}"


def family_support(methods: list[str] | None = None) -> list[FamilySupport]:
    """One row per registered family: every method (default: all registered) on each of its tiny builds."""
    methods = methods or available_methods()
    by_adapter: dict[type[BackboneAdapter], list[str]] = {}
    for model_class, adapter in registered_adapters().items():
        by_adapter.setdefault(adapter, []).append(model_class.__name__)
    rows = []
    for adapter, classes in by_adapter.items():
        bases = {
            name: (create_backbone(arch, num_classes=2, **options).eval(), size)
            for name, (arch, options, size) in adapter.tiny_builds.items()
            if timm.is_model(arch)  # older timm releases lack some (DINOv3, RoPE ViTs)
        }
        if not bases:
            continue
        cells = {m: _summary({n: _try(m, base, size) for n, (base, size) in bases.items()}) for m in methods}
        builds = tuple(adapter.tiny_builds[name][0] for name in bases)
        rows.append(FamilySupport(adapter.family, tuple(sorted(classes)), builds, cells))
    return rows


def markdown_table(rows: list[FamilySupport]) -> str:
    """Family x method as Markdown: ✓, or a numbered note whose reason is listed under the table."""
    methods = list(rows[0].methods) if rows else []
    notes: dict[str, int] = {}

    def cell(text: str) -> str:
        if text == SUPPORTED:
            return text
        prefix = f"{SUPPORTED} except " if text.startswith(f"{SUPPORTED} except ") else ""
        number = notes.setdefault(text, len(notes) + 1)
        return f"{prefix.strip()} ({number})" if prefix else f"({number})"

    lines = [
        "| family | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
        *(f"| {row.family} | " + " | ".join(cell(row.methods[m]) for m in methods) + " |" for row in rows),
        "",
        *(f"({number}) {text.replace('|', '/')}" for text, number in notes.items()),
    ]
    return "\n".join(lines)
