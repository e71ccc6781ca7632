"""``promptvit backbones``: the family x method table is computed by wrapping every method on tiny builds."""

from __future__ import annotations

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
