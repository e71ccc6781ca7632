"""``promptvit backbones``: the family x method table is computed by wrapping every method on tiny builds."""

from __future__ import annotations

import dataclasses

from typer.testing import CliRunner

from promptvit.cli.app import app
from promptvit.family_support import SUPPORTED, family_support, markdown_table


def test_family_support_reports_a_tick_or_the_refusal_reason() -> None:
    rows = {row.family: row for row in family_support(["vpt", "lora", "ept", "da_vpt"])}
    assert {"VisionTransformer", "Eva", "Beit", "SwinTransformer", "ConvNeXt", "ResNet"} <= set(rows)
    assert rows["Eva"].methods["vpt"] == rows["Beit"].methods["vpt"] == SUPPORTED
    assert rows["Eva"].methods["lora"] == rows["Beit"].methods["lora"] == SUPPORTED
    assert "needs a vit backbone" in rows["ConvNeXt"].methods["vpt"]
    for swin in ("SwinTransformer", "SwinTransformerV2"):
        assert rows[swin].methods["lora"] == SUPPORTED  # its window attention's fused qkv
        assert rows[swin].methods["vpt"] == rows[swin].methods["ept"] == SUPPORTED  # prompts in every window
        assert "no class token" in rows[swin].methods["da_vpt"]
    assert "needs a vit backbone" in rows["ConvNeXt"].methods["lora"]
    assert rows["Eva"].methods["ept"] == rows["Beit"].methods["ept"] == SUPPORTED  # rotary, relative bias
    assert rows["VisionTransformer"].methods["ept"] == SUPPORTED
    table = markdown_table(list(rows.values()))
    assert table.splitlines()[0] == "| family | vpt | lora | ept | da_vpt |"
    assert "| VisionTransformer | ✓ | ✓ | ✓ | ✓ |" in table
    assert any(line.startswith("(1) ") for line in table.splitlines())


def test_backbones_verb_prints_the_table() -> None:
    result = CliRunner().invoke(app, ["backbones", "--method", "linear", "--markdown"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "| family | linear |"
    assert "| SwinTransformer | ✓ |" in lines and "| Eva | ✓ |" in lines


def test_registry_rows_wrap_every_method_on_each_class_smallest_architecture() -> None:
    """``--all`` on one timm module: DenseNet's smallest architecture (by parameters, on the meta device)."""
    from promptvit.family_support import registry_markdown, registry_support, timm_model_classes

    (densenet,) = timm_model_classes("densenet")
    assert densenet.name == "DenseNet" and densenet.module == "timm.models.densenet"
    assert densenet.smallest == "densenet121" and densenet.architectures >= 6
    (row,) = registry_support(["linear", "partial", "vpt"], module="densenet")
    assert row.adapter == "Generic" and row.methods["linear"] == row.methods["partial"] == SUPPORTED
    assert "needs a <class> family adapter" in row.methods["vpt"]  # one note for every such class
    table = registry_markdown([row, dataclasses.replace(row, timm_class=dataclasses.replace(densenet, name="Other"))])
    assert table.splitlines()[:3] == [
        "| timm classes | family adapter | linear | partial | vpt |",
        "|---|---|---|---|---|",
        "| DenseNet, Other | Generic | ✓ | ✓ | (1) |",  # the same outcome: one row, one note
    ]
    assert "(1) needs a vit backbone; <class> has no family adapter" in table


def test_backbones_all_prints_every_class(monkeypatch) -> None:
    from promptvit import family_support

    real = family_support.timm_model_classes
    monkeypatch.setattr(family_support, "timm_model_classes", lambda module=None: real("densenet"))
    result = CliRunner().invoke(app, ["backbones", "--all", "--method", "linear", "--method", "vpt", "--markdown"])
    assert result.exit_code == 0, result.output
    assert "| DenseNet | Generic | ✓ | (1) |" in result.output.splitlines()
    result = CliRunner().invoke(app, ["backbones", "--all", "--method", "linear"])
    assert result.exit_code == 0, result.output
    assert "densenet121" in result.output
