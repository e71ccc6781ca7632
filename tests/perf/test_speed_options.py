"""Gradient checkpointing, precision and channels_last options of the engine (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import promptvit
from promptvit.train import TrainConfig, fit
from tests.conftest import without_readout
from tests.families import build_tiny, tiny_input
from tests.train.helpers import CLASSES, single_label_set

METHODS = [
    ("vpt", {"prompt_length": 2, "dropout": 0.1}),  # prompt dropout: recomputation must replay the RNG
    ("ept", {"prompt_length": 3}),
    ("lora", {"rank": 2}),
    ("adapter", {"reduction": 4, "dropout": 0.2}),
    ("ap", {"layer": 1, "variant": "concat"}),
    ("partial", {"num_blocks": 1}),
    ("full", {}),
]


@pytest.mark.parametrize("kind", ["vit_token", "vit_avg_no_cls"])
@pytest.mark.parametrize("method,options", METHODS)
def test_grad_checkpointing_gives_the_same_gradients(kind: str, method: str, options: dict) -> None:
    results = []
    for checkpointing in (False, True):
        # readout off in both: under checkpointing it stands aside, and the comparison is exact
        model = without_readout(promptvit.wrap(build_tiny(kind, num_classes=4), method, **options))
        model.backbone.set_grad_checkpointing(checkpointing)
        model.train()
        torch.manual_seed(0)
        out = model(tiny_input(kind, batch=3))
        params = [p for _, p in model.tuned_named_parameters()]
        grads = torch.autograd.grad((out * out.detach().sin()).sum(), params)
        results.append((out, grads))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    assert torch.equal(plain, checkpointed)
    for a, b in zip(plain_grads, checkpointed_grads, strict=True):
        assert torch.equal(a, b)


def test_grad_checkpointing_in_forward_from_block() -> None:
    model = promptvit.wrap(build_tiny("vit_avg_no_cls", num_classes=4), "ept", layers=[1, 2], prompt_length=3)
    x = tiny_input("vit_avg_no_cls", batch=3)
    with torch.no_grad():
        prefix = model.forward_prefix(x, 1)
    grads = []
    for checkpointing in (False, True):
        model.backbone.set_grad_checkpointing(checkpointing)
        out = model.forward_from_block(prefix, 1)
        grads.append(torch.autograd.grad(out.square().sum(), [p for _, p in model.tuned_named_parameters()]))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def _fit(tmp_path: Path, name: str, method: str = "ept", **options):
    model = promptvit.wrap(build_tiny("vit_avg_no_cls", num_classes=4), method, prompt_length=3)
    config = TrainConfig(epochs=2, lr=0.05, progress=False, **options)
    result = fit(
        model,
        single_label_set(12, 1),
        single_label_set(8, 2),
        config=config,
        run_dir=tmp_path / name,
        multilabel=False,
        class_names=CLASSES,
    )
    return model, result


def _same_runs(a, b) -> None:
    (model_a, result_a), (model_b, result_b) = a, b
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(result_a.history) == strip(result_b.history)
    state_a, state_b = model_a.tuned_state_dict(), model_b.tuned_state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_fit_with_grad_checkpointing_equals_fit_without_and_restores_the_setting(tmp_path: Path) -> None:
    plain = _fit(tmp_path, "plain")
    checkpointed = _fit(tmp_path, "ckpt", grad_checkpointing=True)
    _same_runs(plain, checkpointed)
    assert checkpointed[0].backbone.grad_checkpointing is False
    summary = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    assert summary["speed"]["grad_checkpointing"] is True


def test_low_precision_and_channels_last_are_ignored_on_cpu_with_a_warning(tmp_path: Path) -> None:
    plain = _fit(tmp_path, "plain")
    with pytest.warns(UserWarning, match=r"precision='bf16' is ignored on cpu.*6-8x slower"):
        bf16 = _fit(tmp_path, "bf16", precision="bf16", device="cpu")
    _same_runs(plain, bf16)
    summary = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert summary["speed"]["precision"] == "fp32" and summary["config"]["precision"] == "bf16"
    with pytest.warns(UserWarning, match="channels_last is ignored on cpu"):
        _same_runs(plain, _fit(tmp_path, "cl", channels_last=True, device="cpu"))


def test_checkpoints_without_the_new_fields_still_resume(tmp_path: Path) -> None:
    """Setup entries of the new options are left out at their defaults, so older checkpoints match."""
    _fit(tmp_path, "run")
    meta_path = tmp_path / "run" / "checkpoint" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    new = {"cache_prefix", "cache_dir", "cache_views", "grad_checkpointing", "precision", "channels_last"}
    assert not new & set(meta["setup"])
    # resuming with operational options switched on is allowed (EPT on every block: nothing to cache)
    with pytest.warns(UserWarning, match="no frozen prefix"):
        model, result = _fit(tmp_path, "run", grad_checkpointing=True, cache_prefix=True)
    assert result.best_epoch is not None
