"""Frozen-prefix caching: the hook, cached vs uncached forwards and gradients, and whole fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import promptvit
from promptvit.cache import PrefixCache
from promptvit.methods.base import available_methods
from promptvit.train import TrainConfig, evaluate, fit
from tests.conftest import build_tiny, tiny_input
from tests.train.helpers import CLASSES, single_label_set

# (backbone kind, method, options, expected cut); vit_token has 2 blocks, vit_avg 3, the resnet 4 stages
CASES = [
    ("vit_token", "linear", {}, 2),
    ("vit_avg", "linear", {}, 3),
    ("vit_avg", "mlp", {}, 3),
    ("vit_token", "partial", {"num_blocks": 1}, 1),
    ("vit_avg", "partial", {"num_blocks": 1}, 2),
    ("vit_avg", "partial", {"num_blocks": 2}, 1),
    ("vit_token", "ap", {"layer": 1}, 1),
    ("vit_avg", "ap", {"layer": 1, "variant": "product"}, 1),
    ("vit_avg", "ap", {"layer": 2, "variant": "concat", "prompt_length": 2}, 2),
    ("vit_token", "ept", {"layers": [1], "prompt_length": 3}, 1),
    ("vit_avg", "ept", {"layers": [1, 2], "prompt_length": 3}, 1),
    ("vit_avg", "ept", {"layers": [2], "way": "add"}, 2),
    ("vit_avg", "lora", {"rank": 2, "layers": [1, 2]}, 1),
    ("vit_avg", "adapter", {"reduction": 4, "layers": [2]}, 2),
    ("resnet", "linear", {}, 4),
    ("resnet", "mlp", {}, 4),
]


def _perturbed(model: promptvit.PromptModel, seed: int = 0) -> promptvit.PromptModel:
    """Move every tuned tensor away from its (often zero) init so that every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.tuned_named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_tuned_from_block_of_every_method() -> None:
    depth = 3
    expected = {
        "linear": depth,
        "mlp": depth,
        "partial": depth - 1,
        "ap": 2,  # the paper's default: the third block
        "ept": 0,
        "lora": 0,
        "adapter": 0,
        "bias": 0,
        "norm": 0,
        "full": 0,
        "vp": 0,
        "vpt": 0,
        "spt": 0,
        "da_vpt": 0,
    }
    for name in available_methods():
        model = promptvit.wrap(build_tiny("vit_avg", num_classes=4), name)
        assert model.method.tuned_from_block() == expected.get(name, 0), name
    assert promptvit.wrap(build_tiny("vit_avg"), "partial", num_blocks=3).cache_cut() == 0
    assert promptvit.wrap(build_tiny("vit_avg"), "ap", layer=2).cache_cut() == 2
    assert promptvit.wrap(build_tiny("vit_avg"), "ept", layers=[2, 1]).cache_cut() == 1
    assert promptvit.wrap(build_tiny("vit_avg"), "lora", layers=[2]).cache_cut() == 2
    # CNNs: only the pre-logit features
    assert promptvit.wrap(build_tiny("resnet"), "linear").cache_cut() == 4
    assert promptvit.wrap(build_tiny("resnet"), "partial").cache_cut() == 0


@pytest.mark.parametrize("kind,method,options,cut", CASES)
def test_cached_path_gives_identical_logits_and_gradients(kind, method, options, cut) -> None:
    model = _perturbed(promptvit.wrap(build_tiny(kind, num_classes=4), method, **options))
    assert model.cache_cut() == cut
    x = tiny_input(kind, batch=5)
    target = torch.tensor([0, 1, 2, 3, 0])
    model.train()
    params = [p for _, p in model.tuned_named_parameters()]

    plain = model(x)
    plain_grads = torch.autograd.grad(torch.nn.functional.cross_entropy(plain, target), params)
    model.eval()
    with torch.no_grad():
        prefix = model.forward_prefix(x, cut)
    model.train()
    cached = model.forward_from_block(prefix, cut)
    cached_grads = torch.autograd.grad(torch.nn.functional.cross_entropy(cached, target), params)

    assert torch.equal(plain, cached)
    for (name, _), a, b in zip(model.tuned_named_parameters(), plain_grads, cached_grads, strict=True):
        assert torch.equal(a, b), name
    assert any(g.abs().sum() > 0 for g in cached_grads)


def test_forward_from_block_runs_token_prompt_hooks_after_the_cut() -> None:
    """AP-concat inserts tokens before its block in the block loop and strips them before the final norm."""
    model = _perturbed(
        promptvit.wrap(build_tiny("vit_token", num_classes=4), "ap", layer=1, variant="concat")
    )
    seen = []
    model.backbone.blocks[1].norm1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    x = tiny_input("vit_token", batch=2)
    with torch.no_grad():
        prefix = model.forward_prefix(x, 1)
        assert prefix.shape[1] == model.geometry.num_tokens
        assert torch.equal(model.forward_from_block(prefix, 1), model(x))
    assert seen == [model.geometry.num_tokens + 10] * 2  # inserted at block 1 (stripped before the norm)


def _fit(model, run_dir: Path, **options):
    config = TrainConfig(**{"epochs": 3, "lr": 0.05, "progress": False, "batch_size": 4, **options})
    train, val = single_label_set(26, seed=1), single_label_set(12, seed=2)  # 26: a partial last batch
    return fit(model, train, val, config=config, run_dir=run_dir, multilabel=False, class_names=CLASSES)


def _history(result) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]


@pytest.mark.parametrize(
    "method,options",
    [
        ("linear", {}),
        ("partial", {"num_blocks": 1}),
        ("ap", {"layer": 1}),
        ("ept", {"layers": [1, 2], "prompt_length": 3}),
        ("lora", {"rank": 2, "layers": [2], "dropout": 0.3}),  # dropout: the RNG stream must match too
    ],
)
def test_fit_with_cache_equals_fit_without(tmp_path: Path, method: str, options: dict) -> None:
    runs = []
    for cache in (False, True):
        model = promptvit.wrap(build_tiny("vit_avg", num_classes=4), method, **options)
        result = _fit(model, tmp_path / str(cache), cache_prefix=cache)
        runs.append((result, model.tuned_state_dict()))
    (plain, plain_state), (cached, cached_state) = runs
    assert _history(plain) == _history(cached)
    assert plain.best_epoch == cached.best_epoch and plain.val_metrics == cached.val_metrics
    assert plain_state.keys() == cached_state.keys()
    for name, tensor in plain_state.items():
        assert torch.equal(tensor, cached_state[name]), name
    summary = (tmp_path / "True" / "metrics.json").read_text()
    assert '"prefix_cut": ' in summary


def test_methods_without_a_frozen_prefix_train_uncached_with_a_warning(tmp_path: Path) -> None:
    model = promptvit.wrap(build_tiny("vit_avg", num_classes=4), "bias")
    with pytest.warns(UserWarning, match="no frozen prefix"):
        result = _fit(model, tmp_path, cache_prefix=True, epochs=1)
    assert result.best_epoch == 1


def test_evaluating_several_methods_shares_the_prefix(tmp_path: Path) -> None:
    """EPT from block 1 and AP at layer 1 on one backbone share the cut-1 prefix of the test set."""
    test = single_label_set(20, seed=3)
    cache = PrefixCache(tmp_path / "cache")
    results = []
    for method, options in [("ept", {"layers": [1, 2], "prompt_length": 3}), ("ap", {"layer": 1})]:
        model = _perturbed(promptvit.wrap(build_tiny("vit_avg", num_classes=4), method, **options))
        cached = evaluate(
            model, test, multilabel=False, class_names=CLASSES, batch_size=8, prefix_cache=cache
        )
        plain = evaluate(model, test, multilabel=False, class_names=CLASSES, batch_size=8)
        assert cached == plain
        results.append(cached)
    assert cache.stats["computed"] == 20 and cache.stats["memory_hits"] == 20
    # a new process (empty memory) reads the entries from disk
    fresh = PrefixCache(tmp_path / "cache")
    model = _perturbed(promptvit.wrap(build_tiny("vit_avg", num_classes=4), "ap", layer=1))
    assert evaluate(model, test, multilabel=False, class_names=CLASSES, prefix_cache=fresh) == results[1]
    assert fresh.stats == {"memory_hits": 0, "disk_hits": 20, "computed": 0}


def test_a_second_run_reuses_the_disk_cache(tmp_path: Path) -> None:
    cache_dir = str(tmp_path / "cache")
    first = promptvit.wrap(build_tiny("vit_avg", num_classes=4), "linear", solver="sgd")
    _fit(first, tmp_path / "a", cache_prefix=True, cache_dir=cache_dir, epochs=1)
    cache = PrefixCache(cache_dir)
    second = promptvit.wrap(build_tiny("vit_avg", num_classes=4), "mlp")  # same features, other head
    config = TrainConfig(epochs=2, lr=0.05, progress=False, cache_prefix=True)
    fit(
        second,
        single_label_set(26, seed=1),
        single_label_set(12, seed=2),
        config=config,
        run_dir=tmp_path / "b",
        multilabel=False,
        class_names=CLASSES,
        prefix_cache=cache,
    )
    assert cache.stats["computed"] == 0 and cache.stats["disk_hits"] == 26 + 12
    # two validation passes read the 12 validation entries twice; the training set is looked up once, not
    # once per epoch
    assert cache.stats["memory_hits"] == 12
