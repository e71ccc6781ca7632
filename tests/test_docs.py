"""docs/architecture.md's generated sections (layers, families) are what ``python -m promptvit.docs`` writes now."""

from __future__ import annotations

import pytest
import timm

from promptvit import docs
from promptvit.backbones import registered_adapters


def test_the_architecture_document_is_up_to_date() -> None:
    builds = [arch for adapter in registered_adapters().values() for arch, _, _ in adapter.tiny_builds.values()]
    if not all(timm.is_model(arch) for arch in builds):
        pytest.skip("the families table is written with a timm that makes every family's tiny builds")
    text = docs.ARCHITECTURE.read_text(encoding="utf-8")
    assert docs.render(text, docs.ARCHITECTURE) == text, "docs/architecture.md is stale: run python -m promptvit.docs"


def test_a_stale_section_is_rewritten_and_check_says_so(tmp_path, capsys) -> None:
    path = tmp_path / "architecture.md"
    path.write_text(
        "intro\n<!-- generated: layers -->\nold rows\n<!-- end generated: layers -->\nmiddle\n"
        "<!-- generated: families -->\n<!-- end generated: families -->\nend\n"
    )
    assert docs.main([str(path), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert "old rows" in path.read_text()  # --check writes nothing
    assert docs.main([str(path)]) == 0
    text = path.read_text()
    assert text.startswith("intro\n") and text.endswith("\nend\n") and "old rows" not in text
    assert "| methods | `methods/` |" in text and "| VisionTransformer | `backbones/vit.py` | vit |" in text
    assert docs.main([str(path), "--check"]) == 0


def test_missing_markers_and_files_are_named(tmp_path, capsys) -> None:
    path = tmp_path / "architecture.md"
    path.write_text("<!-- generated: layers -->\n<!-- end generated: layers -->\n")
    assert docs.main([str(path)]) == 2
    assert "needs the section 'families' once" in capsys.readouterr().err
    assert path.read_text() == "<!-- generated: layers -->\n<!-- end generated: layers -->\n"
    assert docs.main([str(tmp_path / "nope.md")]) == 2
    assert "is no file" in capsys.readouterr().err
