"""Batched multi-task inference equals per-task inference."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import promptvit
from promptvit.methods.base import ConfigError
from promptvit.serving import MultiTaskModel
from tests.conftest import build_tiny, tiny_input

SPECS = [
    ("linear", {}),
    ("mlp", {}),
    ("vp", {}),
    ("vp", {"mode": "pad", "pad_size": 2}),
    ("ap", {"layer": 1}),
    ("ap", {"layer": 0, "variant": "product"}),
    ("ap", {"layer": 1, "variant": "concat", "prompt_length": 2}),
    ("ept", {"prompt_length": 3}),
    ("ept", {"layers": [1], "prompt_length": 5}),
    ("ept", {"layers": [0], "way": "add"}),
    ("ept", {"way": "multiply"}),
    ("lora", {"rank": 2}),
    ("lora", {"rank": 3, "targets": ["k"], "layers": [1]}),
    ("vpt", {"prompt_length": 2}),
    ("vpt", {"prompt_length": 2, "deep": False}),
    ("vpt", {"prompt_length": 2}),
    ("ept", {"way": "multi_cat", "prompt_length": 2}),
    ("adapter", {"reduction": 4}),
    # backbone weights tuned in place: a forward of their own
    ("bias", {}),
    ("partial", {}),
]
GROUPED = {"bias", "partial"}


def _tasks(kind: str, base: torch.nn.Module) -> list[promptvit.PromptModel]:
    g = torch.Generator().manual_seed(0)
    models = []
    for i, (method, options) in enumerate(SPECS):
        model = promptvit.wrap(copy.deepcopy(base), method, num_classes=2 + i % 3, **options)
        with torch.no_grad():
            for _, p in model.tuned_named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        models.append(model.eval())
    return models


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit_token", "vit_avg"])
def test_all_tasks_on_every_image_equal_per_task_inference(kind: str) -> None:
    base = build_tiny(kind, num_classes=3)
    models = _tasks(kind, base)
    served = MultiTaskModel(base, models)
    grouped = [name for name, (m, _) in zip(served.task_names, SPECS, strict=True) if m in GROUPED]
    assert served.grouped_tasks == grouped
    x = tiny_input(kind, batch=5)
    out = served(x)
    assert list(out) == served.task_names
    for name, model in zip(served.task_names, models, strict=True):
        with torch.no_grad():
            _close(out[name], model(x))


def test_mixed_task_ids_equal_per_task_inference_per_sample() -> None:
    base = build_tiny("vit_token", num_classes=3)
    models = _tasks("vit_token", base)
    served = MultiTaskModel(base, models, names=[f"t{i}" for i in range(len(models))])
    x = tiny_input("vit_token", batch=8, seed=3)
    ids = torch.tensor([0, 7, 13, 17, 11, 7, 2, 19])
    rows = served.logits_per_sample(x, ids)
    for b, t in enumerate(ids.tolist()):
        with torch.no_grad():
            _close(rows[b], models[t](x[b : b + 1])[0])
    grouped = served(x, [f"t{t}" for t in ids.tolist()])
    with torch.no_grad():
        _close(grouped["t7"], models[7](x[[1, 5]]))
    assert set(grouped) == {f"t{t}" for t in set(ids.tolist())}


def test_artifact_folders_and_cnn_backbones(tmp_path: Path) -> None:
    base = build_tiny("resnet", num_classes=3)
    dirs = []
    models = []
    for i, method in enumerate(["linear", "mlp", "bias"]):
        model = promptvit.wrap(copy.deepcopy(base), method, num_classes=4)
        with torch.no_grad():
            for _, p in model.tuned_named_parameters():
                p.add_(0.1 * (i + 1))
        dirs.append(model.eval().save_pretrained(tmp_path / method))
        models.append(model)
    served = MultiTaskModel(base, dirs)
    assert served.task_names == ["linear", "mlp", "bias"]
    assert served.batched_tasks == ["linear", "mlp"] and served.grouped_tasks == ["bias"]
    x = tiny_input("resnet", batch=3)
    out = served(x)
    for name, model in zip(served.task_names, models, strict=True):
        with torch.no_grad():
            _close(out[name], model(x))


def test_tasks_of_other_backbone_weights_are_refused() -> None:
    other = promptvit.wrap(build_tiny("vit_token", num_classes=3, seed=1), "linear")
    with pytest.raises(ConfigError, match="other backbone weights"):
        MultiTaskModel(build_tiny("vit_token", num_classes=3), [other])


def test_a_refused_task_gives_the_backbone_back_unwrapped(tmp_path: Path) -> None:
    """The base backbone is wrapped in place, not copied: a task refused halfway unloads it again."""
    base = build_tiny("vit_token", num_classes=3)
    reference = copy.deepcopy(base)
    good = promptvit.wrap(copy.deepcopy(base), "vpt", prompt_length=2).eval()
    other = promptvit.wrap(build_tiny("vit_token", num_classes=3, seed=1), "linear")
    good.save_pretrained(tmp_path / "colon-vpt")  # folder names need not be identifiers
    with pytest.raises(ConfigError, match="other backbone weights"):
        MultiTaskModel(base, [tmp_path / "colon-vpt", other])
    x = tiny_input("vit_token")
    with torch.no_grad():
        assert torch.equal(base(x), reference(x))
    served = MultiTaskModel(base, [tmp_path / "colon-vpt", good])  # free to be served again
    assert served.task_names == ["colon-vpt", "task1"] and served.model.backbone is base
    with torch.no_grad():
        out = served(x)
        _close(out["colon-vpt"], good(x))
        _close(out["task1"], good(x))
    assert torch.equal(served.model.unload()(x), reference(x))
