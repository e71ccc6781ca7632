"""The README's first example runs as written and reloads, from a Hub cache holding timm's weights file.

The cache holds a randomly initialised ViT-B/16 under timm's Hub id for the name the README uses (no network),
so the example goes through timm's real pretrained loading path: ``timm.create_model(NAME, pretrained=True)``.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import promptvit
from tests.export.conftest import populate_hub_cache

README = Path(__file__).parents[2] / "README.md"


def first_python_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_first_readme_example_runs_and_reloads(tmp_path, monkeypatch, hub_cache):
    code = first_python_example()
    name = re.search(r'timm.create_model\("([^"]+)", pretrained=True\)', code).group(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        weights = timm.create_model(name).state_dict()
    (tmp_path / "hub-files").mkdir()
    save_file(weights, str(tmp_path / "hub-files" / "model.safetensors"))
    populate_hub_cache(hub_cache, timm.models.get_pretrained_cfg(name).hf_hub_id, tmp_path / "hub-files")
    monkeypatch.chdir(tmp_path)

    saving, loading = code.split("model = promptvit.load(", 1)
    loading = "model = promptvit.load(" + loading
    printed = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(saving, str(README), "exec"), namespace)  # noqa: S102  (the README's own code)
    # The comment under print_trainable_parameters() is what it prints.
    assert printed.getvalue().strip() == re.search(r"# (method .*)", code).group(1)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = namespace["model"].eval()(images)
    exec(compile(loading, str(README), "exec"), namespace)  # noqa: S102
    # Both reloads (without base_model, then with it) give the saved model's logits.
    with torch.no_grad():
        assert torch.equal(namespace["model"].eval()(images), expected)
        assert torch.equal(promptvit.load("colon-ept").eval()(images), expected)
