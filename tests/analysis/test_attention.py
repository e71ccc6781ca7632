"""Attention extraction against timm's own (non-fused) attention on every token family; distance measures on
constructed patterns."""

from __future__ import annotations

import copy
import dataclasses
import functools
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
    layer_attention_distance,
    plot_attention_distance,
    plot_attention_maps,
    prompt_attention_maps,
)
from promptvit.analysis.extract import TokenLayout
from promptvit.backbones import AttentionParts, BackboneError, PartsFromCall, adapter_for, registered_adapters
from promptvit.backbones.vit import timm_attention_parts
from tests.conftest import build_tiny, tiny_input
from tests.families import FAMILY_BUILDS, build, family_input

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


# Every token family's tiny builds, from the adapters' registry: a new family is checked with no edit here.
TOKEN_BUILDS = [
    name
    for adapter in dict.fromkeys(registered_adapters().values())
    if adapter.kind == "vit"
    for name in adapter.tiny_builds
    if name in FAMILY_BUILDS
]
# Methods that attach to token models: prompts, EPT's prompted attention, LoRA's qkv, ... on every family.
TOKEN_METHODS = [None, *(m for m in promptvit.available_methods() if "vit" in promptvit.get_method(m).supported_kinds)]


@functools.cache
def _family_base(name: str) -> nn.Module:
    return build(FAMILY_BUILDS, name)


def _nonzero(model: nn.Module) -> nn.Module:
    """Every parameter timm (or a method) starts at zero gets random values (q/v biases, BEiT's relative
    position bias table, LoRA's B), LayerScale O(1) values: the attention then depends on all of them."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] in ("gamma", "gamma_1", "gamma_2"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            elif not p.any():
                p.copy_(torch.randn(p.shape, generator=generator))
    return model


def _family_model(name: str, method: str | None) -> nn.Module:
    model = copy.deepcopy(_family_base(name))
    if method is not None:
        model = promptvit.wrap(model, method, num_classes=3, **promptvit.get_method(method).test_options)
    return _nonzero(model)


class _TimmProbabilities:
    """The probabilities timm's own attention modules compute in a forward (unfused path, read at attn_drop).

    Where a method layer replaced the module (EPT), timm's module under it is called on the input and
    arguments the layer received.
    """

    def __init__(self, model: nn.Module) -> None:
        self.captures: list[_Capture] = []
        self.replaced: dict[int, tuple[nn.Module, tuple, dict]] = {}
        for index, block in enumerate(getattr(model, "backbone", model).blocks):
            family = block.attn
            while hasattr(family, "base_layer"):
                family = family.base_layer
            family.fused_attn = False
            family.attn_drop = _Capture()
            self.captures.append(family.attn_drop)
            if family is not block.attn:
                block.attn.register_forward_pre_hook(
                    lambda m, a, k, i=index, f=family: self.replaced.__setitem__(i, (f, a, k)), with_kwargs=True
                )

    def probabilities(self) -> list[torch.Tensor]:
        with torch.no_grad():
            for family, args, kwargs in self.replaced.values():
                family(*args, **kwargs)
        return [capture.seen[-1] for capture in self.captures]


def _attention_errors(model: nn.Module, images: torch.Tensor) -> list[float]:
    """Per block, the largest difference between the recorded maps and the model's own probabilities.

    A layer's ``attention_weights`` (EPT) are compared after renormalising each row: EPT's prompt columns
    only add to the softmax denominator, so the rows are timm's probabilities times the EPT gate.
    """
    reference = _TimmProbabilities(model)
    records = capture_attention(model, images)
    errors = []
    for record, expected in zip(records, reference.probabilities(), strict=True):
        probs = record.probs
        if record.source == "attention_weights":
            probs = probs / probs.sum(-1, keepdim=True)
            torch.testing.assert_close(record.token_scale, record.probs.sum(-1))
        assert probs.shape == expected.shape
        errors.append((probs - expected).abs().max().item())
    return errors


@pytest.mark.parametrize("method", TOKEN_METHODS)
@pytest.mark.parametrize("name", TOKEN_BUILDS)
def test_attention_maps_are_the_models_own_probabilities(name: str, method: str | None) -> None:
    if method is not None and not promptvit.get_method(method).supports(adapter_for(_family_base(name))):
        pytest.skip(f"{method} does not attach to {name}")
    model = _family_model(name, method)
    images = family_input(FAMILY_BUILDS, name, batch=3)
    assert max(_attention_errors(model, images)) < 2e-6


def _without_positions(parts_from_call: PartsFromCall, dropped: set[str]) -> PartsFromCall:
    def parts(attn: nn.Module, call: dict) -> AttentionParts:
        full = parts_from_call(attn, call)
        dropped.update(term for term in ("rotate", "logit_bias") if getattr(full, term) is not None)
        return dataclasses.replace(full, rotate=None, logit_bias=None)

    return parts


def test_the_check_fails_without_rotary_positions_or_relative_bias(monkeypatch) -> None:
    """Recorded maps that ignore the family's rotary positions or relative position bias (the bug of reading
    plain ViT parts) fail the check above, on every build whose attention has them; both kinds are covered."""
    seen: set[str] = set()
    for name in TOKEN_BUILDS:
        model = _family_model(name, None)
        adapter_class = type(adapter_for(model))
        family_parts = adapter_class.attention_parts_from_call
        dropped: set[str] = set()
        with monkeypatch.context() as patch:
            patch.setattr(
                adapter_class,
                "attention_parts_from_call",
                lambda self, i, f=family_parts, d=dropped: _without_positions(f(self, i), d),
            )
            errors = _attention_errors(model, family_input(FAMILY_BUILDS, name, batch=3))
        if dropped:
            assert max(errors) > 1e-3, f"{name}: dropping {dropped} went unnoticed ({max(errors):.2e})"
        seen |= dropped
    assert seen == {"rotate", "logit_bias"}


def test_attention_recorder_refuses_a_backbone_without_token_blocks() -> None:
    with pytest.raises(BackboneError, match="no token blocks"):
        AttentionRecorder(build_tiny("resnet"))


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
    reference = _TimmProbabilities(model)
    records = capture_attention(model, images)
    expected = reference.probabilities()
    assert len(records) == len(expected)
    for record, probs in zip(records, expected, strict=True):
        assert record.source == "recomputed" and record.token_scale is None
        torch.testing.assert_close(record.probs, probs, rtol=1e-5, atol=1e-6)
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

    def attention_weights(self, x: torch.Tensor, **call) -> torch.Tensor:
        return 0.5 * timm_attention_parts(self.base_layer).probabilities(x)

    def token_scale(self, x: torch.Tensor, **call) -> torch.Tensor:
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
