"""Optimiser parameter groups (weight-decay exemptions) and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from promptvit.train import TrainConfig
from promptvit.train.optim import build_optimizer, build_scheduler
from tests.train.helpers import tiny_model


def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.tuned_named_parameters()}  # artifact keys of the tuned tensors
    return {g["group"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}


def test_no_decay_on_biases_norms_and_tokens_but_prompts_decay_like_any_weight() -> None:
    model = tiny_model("full")
    model.method.prompt_embeddings = nn.Parameter(torch.zeros(1, 2, 32))  # 3-D: decayed whatever its name
    model.method.bias_delta = nn.Parameter(torch.zeros(32))  # 1-D: not decayed
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.05))
    groups = _group_names(model, optimizer)
    decay = {
        "method.prompt_embeddings",
        "backbone.patch_embed.proj.weight",
        "backbone.head.weight",
        *(
            f"backbone.blocks.{i}.{w}.weight"
            for i in range(2)
            for w in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        ),
    }
    assert groups["decay"] == decay
    tuned = {n for n, _ in model.tuned_named_parameters()}
    assert groups["no_decay"] == tuned - decay
    assert {"method.bias_delta", "backbone.cls_token", "backbone.pos_embed"} <= groups["no_decay"]
    assert "backbone.blocks.0.norm1.weight" in groups["no_decay"]
    wd = {g["group"]: g["weight_decay"] for g in optimizer.param_groups}
    assert wd == {"decay": 0.05, "no_decay": 0.0}
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9


def test_decay_all_puts_every_tuned_parameter_in_one_decayed_group() -> None:
    model = tiny_model("bias")
    optimizer = build_optimizer(model, TrainConfig(decay_all=True, optimizer="adamw", weight_decay=0.3))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0.3
    assert _group_names(model, optimizer)["decay"] == {n for n, _ in model.tuned_named_parameters()}


def test_all_but_head_bias_and_a_head_weight_decay_of_its_own() -> None:
    model = tiny_model("bias")
    tuned = {n for n, _ in model.tuned_named_parameters()}
    vpt = _group_names(model, build_optimizer(model, TrainConfig(weight_decay_rule="all_but_head_bias")))
    assert vpt == {"decay": tuned - {"backbone.head.bias"}, "no_decay": {"backbone.head.bias"}}
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.01, head_weight_decay=3.0))
    groups = _group_names(model, optimizer)
    assert groups["head"] == {"backbone.head.weight"} and "decay" not in groups  # bias: biases only
    assert {g["group"]: g["weight_decay"] for g in optimizer.param_groups} == {"no_decay": 0.0, "head": 3.0}


def test_decay_all_and_another_rule_are_refused() -> None:
    with pytest.raises(ValueError, match="disagree"):
        TrainConfig(decay_all=True, weight_decay_rule="all_but_head_bias")


def test_only_tuned_parameters_are_optimised() -> None:
    model = tiny_model("linear")
    groups = _group_names(model, build_optimizer(model, TrainConfig()))
    assert groups == {"decay": {"backbone.head.weight"}, "no_decay": {"backbone.head.bias"}}


def test_per_epoch_schedule_holds_the_lr_for_a_whole_epoch() -> None:
    """mmcv/VPT per-epoch schedules: epoch e of E runs at warm-up e / W, then cosine with progress (e - W) / (E - W)."""
    cfg = TrainConfig(epochs=10, warmup_epochs=2, lr=0.1, schedule_unit="epoch")
    lrs = _lrs(cfg, steps_per_epoch=5, steps=49)
    for epoch in range(10):
        rows = lrs[5 * epoch : 5 * epoch + 5]
        expected = 0.1 * epoch / 2 if epoch < 2 else 0.1 * 0.5 * (1 + math.cos(math.pi * (epoch - 2) / 8))
        assert rows == pytest.approx([expected] * 5), epoch


def _lrs(cfg: TrainConfig, steps_per_epoch: int, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.peak_lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    values = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        values.append(optimizer.param_groups[0]["lr"])
    return values


def test_warmup_then_cosine_to_min_lr() -> None:
    cfg = TrainConfig(epochs=10, warmup_epochs=2, lr=0.1, min_lr=0.01)
    lrs = _lrs(cfg, steps_per_epoch=5, steps=50)  # 50 updates, 10 of warm-up
    assert lrs[0] == 0.0  # warm-up starts at 0 (VPT)
    assert lrs[5] == pytest.approx(0.05)
    assert lrs[10] == pytest.approx(0.1)  # end of warm-up: the peak
    assert lrs[30] == pytest.approx(0.01 + 0.09 * 0.5)  # half-way through the cosine
    assert lrs[20] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lrs[50] == pytest.approx(0.01)  # end = min_lr
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))


def test_no_warmup_starts_at_peak_and_max_steps_sets_the_span() -> None:
    lrs = _lrs(TrainConfig(epochs=100, max_steps=8, lr=0.2), steps_per_epoch=3, steps=8)
    assert lrs[0] == 0.2
    assert lrs[4] == pytest.approx(0.1)
    assert lrs[8] == pytest.approx(0.0, abs=1e-12)


def test_scaled_lr_is_the_peak() -> None:
    lrs = _lrs(TrainConfig(epochs=2, lr=0.4, batch_size=64, scale_lr=True), steps_per_epoch=2, steps=1)
    assert lrs[0] == pytest.approx(0.1)


def test_scheduler_resumes_from_its_state_dict() -> None:
    cfg = TrainConfig(epochs=6, warmup_epochs=1, lr=0.1, min_lr=0.001)
    straight = _lrs(cfg, steps_per_epoch=4, steps=24)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.peak_lr)
    scheduler = build_scheduler(optimizer, cfg, 4)
    for _ in range(9):
        optimizer.step()
        scheduler.step()
    state, optim_state = scheduler.state_dict(), optimizer.state_dict()
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.peak_lr)
    resumed = build_scheduler(other, cfg, 4)
    other.load_state_dict(optim_state)
    resumed.load_state_dict(state)
    values = [other.param_groups[0]["lr"]]
    for _ in range(15):
        other.step()
        resumed.step()
        values.append(other.param_groups[0]["lr"])
    assert values == straight[9:]
