"""Which method runs on which backbone family: every registered method tried on every family's tiny builds.

The answer is computed, not written down: each family adapter carries small random-init builds with its
architecture options (``BackboneAdapter.tiny_builds``); a method counts as supported on a family when it wraps
and runs a forward pass on every one of them, and otherwise the ``ConfigError`` it raised is the reason.
``promptvit backbones`` prints this table; the README's family table is its ``--markdown`` output.

``promptvit backbones --all`` answers the same question for every model class in timm's registry: each
class's smallest architecture (parameters counted on the ``meta`` device, where building costs no memory and
no initialisation) is built on ``meta`` and every method is wrapped on it; ✓ means it wraps, otherwise the
reason it is refused. The registry test (``tests/test_timm_registry.py``) runs ``linear`` on real builds of
those architectures.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable

import timm
import torch

from promptvit.backbones import (
    BackboneAdapter,
    adapter_class_for,
    adapter_for,
    build_structure,
    create_backbone,
    geometry_of,
    registered_adapters,
)
from promptvit.errors import PromptvitError
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


def _kind_refusal(method: str, base: torch.nn.Module) -> str | None:
    """Why ``method`` cannot run on ``base``'s kind of backbone (the same for every such method: one note)."""
    cls = get_method(method)
    adapter = adapter_for(base)
    if cls.supports(adapter):
        return None
    why = adapter.kind_note or f"this family is a {geometry_of(base).kind} (stages of feature maps)"
    # the generic adapter's note names the model's class: one note for all of them
    return f"needs a {' or '.join(cls.supported_kinds)} backbone; {why}".replace(type(base).__name__, "<class>")


def _try(method: str, base: torch.nn.Module, size: int) -> str:
    cls = get_method(method)
    refusal = _kind_refusal(method, base)
    if refusal is not None:
        return refusal
    try:
        with warnings.catch_warnings():  # a method that runs differently than asked says so: it still runs
            warnings.simplefilter("ignore")
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
        name = "any other timm model" if model_class is torch.nn.Module else model_class.__name__
        by_adapter.setdefault(adapter, []).append(name)
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
    return sorted(rows, key=lambda row: row.family == "Generic")  # the fallback last


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


# ---------------------------------------------------------------------- every model class in timm's registry


@dataclasses.dataclass(frozen=True)
class TimmClass:
    """One model class of timm's registry and its smallest registered architecture."""

    name: str  # the class name, e.g. "DenseNet"
    module: str  # the timm module that defines it, e.g. "timm.models.densenet"
    smallest: str  # its registered architecture with the fewest parameters
    parameters: int  # of that architecture (default build options)
    architectures: int  # registered architectures of this class


def _build_on_meta(name: str) -> torch.nn.Module:
    """``name``'s default build with its parameters on the meta device (:func:`build_structure`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_structure(name, {})


@functools.cache
def timm_model_classes(module: str | None = None) -> tuple[TimmClass, ...]:
    """Every model class timm registers (in one timm module, or in all), each with its smallest architecture.

    Each registered architecture is built once on the ``meta`` device to learn its class and count its
    parameters (about 0.1 s each; an architecture that cannot be built there is left out).
    """
    names = timm.list_models(module=module) if module else timm.list_models()
    found: dict[type, list[tuple[int, str]]] = {}
    for name in names:
        try:
            model = _build_on_meta(name)
        except Exception:  # noqa: BLE001  (a broken registry entry must not hide the others)
            continue
        found.setdefault(type(model), []).append((sum(p.numel() for p in model.parameters()), name))
    classes = [
        TimmClass(cls.__name__, cls.__module__, min(archs)[1], min(archs)[0], len(archs))
        for cls, archs in found.items()
    ]
    return tuple(sorted(classes, key=lambda c: (c.module, c.name)))


@dataclasses.dataclass(frozen=True)
class ClassSupport:
    timm_class: TimmClass
    adapter: str  # the family adapter that takes the class ("Generic" for timm's contract alone), or ""
    methods: dict[str, str]  # method -> SUPPORTED or the reason it is refused


def _wraps(method: str, base: torch.nn.Module) -> str:
    """✓ if ``method`` wraps ``base`` (a meta build: nothing runs), else the reason it is refused."""
    refusal = _kind_refusal(method, base)
    if refusal is not None:
        return refusal
    options = {k: v for k, v in get_method(method).test_options.items() if k != "cnn_input_size"}  # own size
    try:
        with warnings.catch_warnings():  # a method that runs differently than asked says so: it still runs
            warnings.simplefilter("ignore")
            wrap(copy.deepcopy(base), method, num_classes=2, **options)
    except PromptvitError as error:
        return str(error)
    return SUPPORTED


def registry_support(
    methods: list[str] | None = None,
    progress: Callable[[TimmClass], None] | None = None,
    module: str | None = None,
) -> list[ClassSupport]:
    """One row per model class of timm's registry (or of one timm ``module``): every method wrapped on its
    smallest architecture (meta)."""
    methods = methods or available_methods()
    rows = []
    for timm_class in timm_model_classes(module):
        if progress is not None:
            progress(timm_class)
        base = _build_on_meta(timm_class.smallest)
        adapter = adapter_class_for(base)
        try:
            adapter_for(base)
        except PromptvitError as error:
            rows.append(ClassSupport(timm_class, "", {m: str(error) for m in methods}))
            continue
        rows.append(ClassSupport(timm_class, adapter.family, {m: _wraps(m, base) for m in methods}))
    return rows


def registry_notes(rows: list[ClassSupport]) -> tuple[list[list[str]], dict[str, int]]:
    """Each row's cells (✓ or a note number) and the notes (reason -> number).

    A reason that names its class is compared, and printed, with ``<class>`` in its place, so classes refused
    for the same reason share a note.
    """
    notes: dict[str, int] = {}
    cells = []
    for row in rows:
        cells.append([])
        for text in row.methods.values():
            if text == SUPPORTED:
                cells[-1].append(text)
            else:
                reason = text.replace(row.timm_class.name, "<class>").replace("|", "/")
                cells[-1].append(f"({notes.setdefault(reason, len(notes) + 1)})")
    return cells, notes


def registry_markdown(rows: list[ClassSupport]) -> str:
    """The registry table as Markdown: classes with the same cells share a row; reasons are numbered notes."""
    methods = list(rows[0].methods) if rows else []
    cells, notes = registry_notes(rows)
    groups: dict[tuple[str, ...], list[str]] = {}
    for row, row_cells in zip(rows, cells, strict=True):
        groups.setdefault((row.adapter, *row_cells), []).append(row.timm_class.name)

    def order(item: tuple[tuple[str, ...], list[str]]) -> tuple:
        """Family adapters by name, then the generic adapter's classes (larger groups first), then the refused."""
        adapter = item[0][0]
        generic = adapter in ("Generic", "")
        return (generic, adapter == "", -len(item[1]) if generic else 0, item[0])

    lines = [
        "| timm classes | family adapter | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
        *(
            f"| {', '.join(sorted(members))} | {key[0] or 'none'} | " + " | ".join(key[1:]) + " |"
            for key, members in sorted(groups.items(), key=order)
        ),
        "",
        *(f"({number}) {reason}" for reason, number in notes.items()),
    ]
    return "\n".join(lines)
