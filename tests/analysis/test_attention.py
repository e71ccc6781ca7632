"""Attention extraction against timm's own (non-fused) attention; distance measures on constructed patterns."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import promptvit
from promptvit.analysis.attention import (
    AttentionRecorder,
    attention_distance,
    average_attention_distance,
    capture_attention,
    cls_attention_map,
    cls_attention_share,
    find_attention_module,
    layer_attention_distance,
    plot_attention_distance,
    plot_attention_maps,
    prompt_attention_maps,
    recompute_attention,
)
from promptvit.analysis.extract import TokenLayout, all_token_outputs, eval_mode
from tests.conftest import build_tiny, tiny_input

GRID = (3, 4)
N = GRID[0] * GRID[1]


def _centre(index: int, patch: tuple[float, float]) -> tuple[float, float]:
    return (index // GRID[1]) * patch[0], (index % GRID[1]) * patch[1]


def _dist(i: int, j: int, patch: tuple[float, float] = (1, 1)) -> float:
    (a, b), (c, d) = _centre(i, patch), _centre(j, patch)
    return math.hypot(a - c, b - d)


def test_self_attention_has_zero_distance() -> None:
    assert attention_distance(torch.eye(N), GRID).item() == 0.0


@pytest.mark.parametrize("patch", [(1, 1), (16, 16), (2, 3)])
def test_uniform_attention_is_the_mean_pairwise_distance(patch: tuple[int, int]) -> None:
    expected = sum(_dist(i, j, patch) for i, j in itertools.product(range(N), repeat=2)) / N**2
    uniform = torch.full((2, 5, N, N), 1.0 / N)  # batch and heads are kept
    value = attention_distance(uniform, GRID, patch)
    assert value.shape == (2, 5)
    torch.testing.assert_close(value, torch.full((2, 5), expected, dtype=torch.float64))


def test_attention_to_one_far_patch() -> None:
    far = N - 1  # bottom-right corner
    attn = torch.zeros(N, N)
    attn[:, far] = 1.0
    expected = sum(_dist(i, far) for i in range(N)) / N
    assert attention_distance(attn, GRID).item() == pytest.approx(expected)
    # only the opposite corner attending: the grid diagonal
    single = torch.eye(N)
    single[0] = attn[0]
    assert attention_distance(single, GRID).item() == pytest.approx(math.hypot(2, 3) / N)


def test_prefix_and_prompt_tokens_are_excluded_and_rows_renormalised() -> None:
    layout = TokenLayout(num_prefix=1, num_prompts=2, grid=GRID)
    probs = torch.zeros(1, 1, layout.num_tokens, layout.num_tokens)
    patches = layout.patches
    probs[..., :, 0] = 0.5  # half of every row goes to CLS
    probs[..., :, 1:3] = 0.2  # some to the prompts
    probs[..., patches, patches] = torch.eye(N) * 0.1  # the rest to itself
    assert layer_attention_distance(probs, layout).item() == 0.0
    share = cls_attention_share(probs, layout)
    assert share["prefix"].item() == pytest.approx(0.5) and share["prompts"].item() == pytest.approx(0.4)


def test_maps_read_the_right_rows() -> None:
    layout = TokenLayout(num_prefix=1, num_prompts=2, grid=GRID)
    probs = torch.rand(2, 3, layout.num_tokens, layout.num_tokens)
    cls = cls_attention_map(probs, layout)
    assert cls.shape == (2, 3, *GRID)
    torch.testing.assert_close(cls.reshape(2, 3, -1), probs[:, :, 0, 3:])
    prompts = prompt_attention_maps(probs, layout, [1])
    assert prompts.shape == (2, 1, 3, *GRID)
    torch.testing.assert_close(prompts[:, 0].reshape(2, 3, -1), probs[:, :, 2, 3:])
    with pytest.raises(ValueError):
        prompt_attention_maps(probs, layout, [2])


class _Capture(nn.Module):
    """Stands in for attn_drop to record the probabilities timm computes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x


def _timm_attention(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    backbone = getattr(model, "backbone", model)
    captures = []
    for block in backbone.blocks:
        attn = find_attention_module(block.attn)
        attn.fused_attn = False
        attn.attn_drop = _Capture()
        captures.append(attn.attn_drop)
    with torch.no_grad(), eval_mode(model), all_token_outputs(model):  # every attention row runs
        model(images)
    return [c.seen[-1] for c in captures]


@pytest.mark.parametrize(
    "kind,method,options",
    [
        ("vit_token", None, {}),
        ("vit_avg", None, {}),
        ("vit_token", "lora", {"rank": 2}),
        ("vit_avg", "vpt", {"prompt_length": 2}),
    ],
)
def test_recomputed_attention_equals_timm(kind: str, method: str | None, options: dict) -> None:
    model = build_tiny(kind)
    if method is not None:
        model = promptvit.wrap(model, method, num_classes=3, **options)
        if method == "lora":  # non-zero LoRA update, so that the qkv path really matters
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    nn.init.normal_(p, std=0.5)
    images = tiny_input(kind, batch=3)
    records = capture_attention(model, images)
    expected = _timm_attention(model, images)
    assert len(records) == len(expected)
    for record, reference in zip(records, expected, strict=True):
        assert record.source == "recomputed" and record.token_scale is None
        torch.testing.assert_close(record.probs, reference, rtol=1e-5, atol=1e-6)
    if method == "vpt":
        layout = TokenLayout.from_count(records[0].probs.shape[-1], 0, (4, 4))
        assert layout.num_prompts == model.method.config.prompt_length


class _Cooperating(nn.Module):
    """A method layer that changes attention and says how (attention_weights / token_scale)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        return self.base_layer(x)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * recompute_attention(self.base_layer, x)

    def token_scale(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full(x.shape[:1] + (self.base_layer.num_heads, x.shape[1]), 0.25)


class _Silent(_Cooperating):
    attention_weights = None  # type: ignore[assignment]
    token_scale = None  # type: ignore[assignment]


def test_wrapper_layers_use_their_api_or_the_inner_attention() -> None:
    model = build_tiny("vit_token")
    images = tiny_input("vit_token")
    plain = capture_attention(model, images)
    model.blocks[0].attn = _Cooperating(model.blocks[0].attn)
    model.blocks[1].attn = _Silent(model.blocks[1].attn)
    records = capture_attention(model, images)
    assert [r.source for r in records] == ["attention_weights", "recomputed_inner"]
    torch.testing.assert_close(records[0].probs, 0.5 * plain[0].probs)
    torch.testing.assert_close(records[1].probs, plain[1].probs)
    assert records[0].token_scale.shape == (2, 2, 5) and records[1].token_scale is None


def test_recorder_leaves_no_hooks_and_average_distance(tmp_path) -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "vpt", num_classes=3, prompt_length=2)
    images = tiny_input("vit_token", batch=4)
    hooks_before = [len(b.attn._forward_pre_hooks) for b in model.backbone.blocks]
    model.train()
    distances = average_attention_distance(model, images, batch_size=3)
    assert model.training and model.method.training
    assert [len(b.attn._forward_pre_hooks) for b in model.backbone.blocks] == hooks_before
    assert distances.shape == (2, 2)
    max_pixels = math.hypot(8, 8)  # 2x2 grid of 8-pixel patches
    assert ((distances > 0) & (distances <= max_pixels)).all()
    with AttentionRecorder(model, lambda i, r: r.probs.shape) as recorder, torch.no_grad():
        model.eval()
        model(images)
    assert recorder.records[0] == (4, 2, 7, 7)  # CLS + 2 prompts + 4 patches
    plot_attention_distance({"vpt": distances}, tmp_path / "d.png")
    maps = torch.rand(4, 2, 2)
    plot_attention_maps(images, [("CLS", maps)], tmp_path / "m.png", title="maps")
    assert (tmp_path / "d.png").exists() and (tmp_path / "m.png").exists()
