"""Head init per ``TrainConfig.head_init`` and BatchNorm statistics frozen by default in few-shot training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

import promptvit
from promptvit.train import TrainConfig, fit
from promptvit.train.head_init import init_head
from tests.conftest import build_tiny


def _cnn_few_shot(n: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g) * 3 + 2, labels)


def _batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{b}": buffer.clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for b, buffer in module.named_buffers()
    }


@pytest.mark.parametrize("batchnorm_stats", ["frozen", "update"])
def test_full_fine_tuning_of_a_cnn_keeps_batchnorm_statistics_by_default(
    tmp_path: Path, batchnorm_stats
) -> None:
    model = promptvit.wrap(build_tiny("resnet", num_classes=2), "full")
    before = _batchnorm_buffers(model)
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("bn1.weight")}
    assert before and weights
    config = TrainConfig(
        epochs=1, batch_size=4, lr=0.05, device="cpu", progress=False, batchnorm_stats=batchnorm_stats
    )
    fit(
        model,
        _cnn_few_shot(),
        None,
        config=config,
        run_dir=tmp_path,
        class_names=["a", "b"],
        multilabel=False,
    )
    after = _batchnorm_buffers(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    if batchnorm_stats == "frozen":
        assert not changed
    else:
        assert {n for n in changed if n.endswith("running_mean")}
    # the affine BatchNorm weights train either way
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)


def test_head_inits_follow_the_papers() -> None:
    torch.manual_seed(0)
    head = nn.Linear(768, 1000)
    init_head(head, "normal_0.01")
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.02) and not head.bias.any()
    torch.manual_seed(1)
    init_head(head, "trunc_normal_0.02")
    reference = torch.empty(1000, 768)
    torch.manual_seed(1)
    timm.layers.trunc_normal_(reference, std=0.02)  # what SPT's and DA-VPT's code call: bounds +-2, absolute
    assert torch.equal(head.weight, reference) and not head.bias.any()
    # not cut at +-2 std (0.04): 4.6 % of a normal's mass lies beyond
    assert head.weight.abs().max() > 0.07 and head.weight.std().item() == pytest.approx(0.02, rel=0.02)
    init_head(head, "kaiming_fan_out_prior")
    assert head.weight.std().item() == pytest.approx(math.sqrt(2 / 1000), rel=0.02)
    assert torch.all(head.bias == -math.log(99)) and torch.sigmoid(head.bias[0]).item() == pytest.approx(0.01)
    before = head.weight.clone()
    init_head(head, "default")
    assert torch.equal(head.weight, before)


def test_fit_applies_the_head_init_on_a_fresh_run(tmp_path: Path) -> None:
    model = promptvit.wrap(build_tiny("vit_token", num_classes=2), "linear", solver="sgd")
    config = TrainConfig(epochs=1, lr=1e-12, device="cpu", progress=False, head_init="kaiming_fan_out_prior")
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fit(
        model,
        TensorDataset(images, torch.tensor([0, 1, 0, 1])),
        None,
        config=config,
        run_dir=tmp_path,
        class_names=["a", "b"],
        multilabel=False,
    )
    torch.testing.assert_close(
        model.get_classifier().bias, torch.full((2,), -math.log(99)), rtol=0, atol=1e-6
    )
