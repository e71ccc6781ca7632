"""``promptvit backbones``: the family x method table is computed by wrapping every method on tiny builds."""

from __future__ import annotations

from typer.testing import CliRunner

from promptvit.cli.app import app
from promptvit.family_support import SUPPORTED, family_support, markdown_table


def test_family_support_reports_a_tick_or_the_refusal_reason() -> None:
    rows = {row.family: row for row in family_support(["vpt", "lora"])}
    assert {"VisionTransformer", "Eva", "Beit", "SwinTransformer", "ConvNeXt", "ResNet"} <= set(rows)
    assert rows["Eva"].methods["vpt"] == rows["Beit"].methods["vpt"] == SUPPORTED
    assert "needs a vit backbone" in rows["ConvNeXt"].methods["vpt"]
    # lora runs on the RoPE ViT and DINOv3 builds of the Eva family but not on EVA-02 (q/v bias inside F.linear)
    assert rows["Eva"].methods["lora"].startswith(f"{SUPPORTED} except eva02")
    assert "F.linear" in rows["Beit"].methods["lora"]
    table = markdown_table(list(rows.values()))
    assert table.splitlines()[0] == "| family | vpt | lora |"
    assert "(1)" in table and table.count(f"| {SUPPORTED} |") >= 2


def test_backbones_verb_prints_the_table() -> None:
    result = CliRunner().invoke(app, ["backbones", "--method", "linear", "--markdown"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "| family | linear |"
    assert "| SwinTransformer | ✓ |" in lines and "| Eva | ✓ |" in lines
