"""SPT: prompts initialised from the tokens each prompted layer receives (and the shared samplers)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import promptvit
from promptvit.layers.prompt_init import (
    PromptTokenSampler,
    pool_windows,
    sample_prompt_tokens,
    window_bounds,
)
from promptvit.layers.token_prompts import vpt_init_bound
from tests.families import build_tiny, tiny_input

VITS = ["vit_token", "vit_avg_no_cls"]


def layer_tokens(vit: torch.nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Tokens each block receives in a plain timm forward: patch_embed output for 0, block input minus prefix."""
    seen: dict[int, torch.Tensor] = {}
    handles = [vit.patch_embed.register_forward_hook(lambda m, a, out: seen.__setitem__(0, out))]
    for i in range(1, len(vit.blocks)):

        def record(module, args, i=i):
            seen[i] = args[0][:, vit.num_prefix_tokens :]

        handles.append(vit.blocks[i].register_forward_pre_hook(record))
    with torch.no_grad():
        vit.forward_features(x)
    for handle in handles:
        handle.remove()
    return seen


def assert_same_rows(rows: torch.Tensor, candidates: torch.Tensor, *, all_used: bool) -> None:
    """Every row of ``rows`` is (exactly) a distinct row of ``candidates``; with all_used, a permutation."""
    distance = torch.cdist(rows.double(), candidates.double())
    index = distance.argmin(dim=1)
    assert index.unique().numel() == rows.shape[0]
    assert torch.equal(rows, candidates[index])
    if all_used:
        assert rows.shape[0] == candidates.shape[0]


@pytest.mark.parametrize("kind", VITS)
def test_prompts_are_the_tokens_of_their_layer(kind: str) -> None:
    base = build_tiny(kind, num_classes=4)
    reference = copy.deepcopy(base)
    n = promptvit.geometry_of(base).num_patches
    model = promptvit.wrap(base, "spt", prompt_length=n)
    x = tiny_input(kind, batch=1)
    info = model.method.initialize_from_data(model, [(x, torch.tensor([0]))])
    assert info["spt_images"] == 1 and info["spt_tokens"] == n * len(base.blocks) and info["spt_seconds"] >= 0
    expected = layer_tokens(reference, x)
    prompts = model.method.prompts.detach()
    assert prompts.shape == (len(base.blocks), n, base.embed_dim)
    for layer in range(len(base.blocks)):
        # k = number of tokens and one image: the prompts are exactly that layer's token rows
        assert_same_rows(prompts[layer], expected[layer][0], all_used=True)
    assert not torch.equal(prompts[0], prompts[1])


def test_prompts_are_drawn_from_all_images() -> None:
    base = build_tiny("vit_avg_no_cls")
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, "spt", prompt_length=5)
    x = tiny_input("vit_avg_no_cls", batch=3)
    model.method.initialize_from_data(model, [x[:2], x[2:]])  # bare image batches are accepted too
    expected = layer_tokens(reference, x)
    for layer in range(3):
        assert_same_rows(model.method.prompts[layer].detach(), expected[layer].flatten(0, 1), all_used=False)


def test_shallow_uses_patch_embeddings_before_position_embedding() -> None:
    base = build_tiny("vit_token")
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, "spt", prompt_length=4, deep=False)
    assert model.method.prompts.shape == (1, 4, 32)
    x = tiny_input("vit_token", batch=1)
    model.method.initialize_from_data(model, [x])
    with torch.no_grad():
        patches = reference.patch_embed(x)[0]
    assert_same_rows(model.method.prompts[0].detach(), patches, all_used=True)


def test_forward_after_init_is_the_vpt_forward_with_those_prompts() -> None:
    base = build_tiny("vit_token", num_classes=4)
    model = promptvit.wrap(base, "spt", prompt_length=2)
    x = tiny_input("vit_token", batch=4)
    model.method.initialize_from_data(model, [x])
    vpt = promptvit.wrap(build_tiny("vit_token", num_classes=4), "vpt", prompt_length=2, dropout=0.0)
    with torch.no_grad():
        vpt.method.prompts.copy_(model.method.prompts)
        vpt.get_classifier().load_state_dict(model.get_classifier().state_dict())
        assert torch.equal(model.eval()(x), vpt.eval()(x))
    assert model.config.dropout == 0.0


def _batches(kind: str, count: int, batch: int = 2):
    return [tiny_input(kind, batch=batch, seed=s) for s in range(count)]


@pytest.mark.parametrize("sampler", ["random", "mean_pool", "max_pool", "kmeans"])
def test_seed_determines_the_prompts(sampler: str) -> None:
    def prompts(seed: int) -> torch.Tensor:
        model = promptvit.wrap(build_tiny("vit_avg_no_cls"), "spt", prompt_length=3, sampler=sampler, seed=seed)
        model.method.initialize_from_data(model, _batches("vit_avg_no_cls", 3))
        return model.method.prompts.detach().clone()

    first = prompts(0)
    assert torch.equal(first, prompts(0))
    assert not torch.equal(first, prompts(1))


def test_window_bounds_follow_the_code() -> None:
    assert window_bounds(196, 20)[:2] == [(0, 10), (10, 20)]
    assert window_bounds(196, 20)[-1] == (190, 196)  # the 20th vector pools the last 196 mod 10 tokens
    assert window_bounds(196, 8)[-1] == (0, 196)  # remainder 0: the code's [-0:] pools everything
    assert len(window_bounds(196, 8)) == 8 and window_bounds(196, 8)[6] == (168, 196)
    assert window_bounds(13, 6) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (12, 13)]  # 13 mod 2 = 1
    assert window_bounds(5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="windows"):
        window_bounds(3, 5)


@pytest.mark.parametrize("mode", ["mean", "max"])
@pytest.mark.parametrize("k", [4, 5])
def test_pooling_samplers_give_the_window_vectors(mode: str, k: int) -> None:
    base = build_tiny("vit_avg_no_cls")  # 16 patches: k=4 -> windows of 5 + the last token; k=5 -> 4x4 + all
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, "spt", prompt_length=k, sampler=f"{mode}_pool")
    x = tiny_input("vit_avg_no_cls", batch=1)
    model.method.initialize_from_data(model, [x])
    tokens = layer_tokens(reference, x)
    for layer in range(3):
        t = tokens[layer][0]
        windows = [t[s:e] for s, e in window_bounds(16, k)]
        pooled = torch.stack([w.mean(0) if mode == "mean" else w.amax(0) for w in windows])
        # the same reductions on a batched, strided view: the vectorised sum order may differ
        torch.testing.assert_close(pool_windows(t[None], k, mode)[0], pooled, rtol=1e-6, atol=1e-7)
        assert_same_rows(model.method.prompts[layer].detach(), pooled, all_used=True)
    assert window_bounds(16, 4)[-1] == (15, 16) and window_bounds(16, 5)[-1] == (0, 16)


def test_kmeans_gives_k_centroids_of_the_tokens() -> None:
    base = build_tiny("vit_avg_no_cls")
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, "spt", prompt_length=3, sampler="kmeans", max_kmeans_tokens=10_000)
    x = tiny_input("vit_avg_no_cls", batch=4)
    model.method.initialize_from_data(model, [x])
    tokens = layer_tokens(reference, x)
    for layer in range(3):
        centroids = model.method.prompts[layer].detach()
        assert centroids.shape == (3, 24) and torch.isfinite(centroids).all()
        points = tokens[layer].flatten(0, 1)
        labels = torch.cdist(points, centroids).argmin(dim=1)
        assert labels.unique().numel() == 3
        for c in range(3):  # a converged k-means centroid is the mean of its points
            torch.testing.assert_close(centroids[c], points[labels == c].mean(0), rtol=1e-4, atol=1e-4)


class CountingBatches:
    """An iterator over many batches that counts the images actually pulled."""

    def __init__(self, kind: str, batches: int, batch: int) -> None:
        self.kind, self.batches, self.batch = kind, batches, batch
        self.pulled = 0

    def __iter__(self):
        for s in range(self.batches):
            self.pulled += self.batch
            yield tiny_input(self.kind, batch=self.batch, seed=s), torch.zeros(self.batch, dtype=torch.long)


@pytest.mark.parametrize("sampler,cap", [("random", 3), ("max_pool", 3), ("kmeans", 6)])
def test_memory_and_images_stay_bounded(sampler: str, cap: int) -> None:
    model = promptvit.wrap(build_tiny("vit_avg_no_cls"), "spt", prompt_length=3)
    stream = CountingBatches("vit_avg_no_cls", batches=50, batch=2)
    sample = sample_prompt_tokens(
        model, stream, [0, 1, 2], 3, sampler, max_images=5, max_kmeans_tokens=cap, seed=0
    )
    assert sample.images == 5 and stream.pulled == 6  # three batches of two, not fifty
    assert sample.tokens_seen == 5 * 16 * 3
    assert sample.max_pool_rows <= cap  # k for random/pooling, max_kmeans_tokens for k-means
    assert [t.shape for t in sample.tokens] == [(3, 24)] * 3

    spt = promptvit.wrap(build_tiny("vit_avg_no_cls"), "spt", prompt_length=3, sampler=sampler, max_images=3)
    stream = CountingBatches("vit_avg_no_cls", batches=50, batch=2)
    assert spt.method.initialize_from_data(spt, stream)["spt_images"] == 3 and stream.pulled == 4


def test_reservoir_is_uniform_over_the_stream() -> None:
    """Each of 40 rows streamed in 8 batches is kept with probability k/40."""
    hits = torch.zeros(40)
    for seed in range(300):
        stream = PromptTokenSampler([0], 4, "random", seed=seed)
        for b in range(8):
            rows = torch.arange(b * 5, b * 5 + 5, dtype=torch.float32)[None, :, None]
            stream.add({0: rows})
        hits[stream.result()[0].long().squeeze(1)] += 1
    assert hits.sum() == 1200
    assert hits.min() > 10 and hits.max() < 50  # expected 30 each


def test_too_few_tokens_is_a_clear_error() -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "spt", prompt_length=9)  # 4 tokens per image
    with pytest.raises(ValueError, match="only 8 candidate tokens"):
        model.method.initialize_from_data(model, [tiny_input("vit_token", batch=2)])
    with pytest.raises(ValueError, match="no training images"):
        model.method.initialize_from_data(model, [])


def test_before_the_data_init_prompts_hold_the_vpt_init() -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "spt", prompt_length=50)
    bound = vpt_init_bound(8, 32)
    assert 0.8 * bound < model.method.prompts.abs().max() <= bound
    assert promptvit.get_method("spt").needs_data_init


def test_data_init_keeps_the_training_mode_and_the_model_prompted() -> None:
    model = promptvit.wrap(build_tiny("vit_token", num_classes=4), "spt", prompt_length=2).train()
    model.method.initialize_from_data(model, [tiny_input("vit_token")])
    assert model.training and model.method.plan.token_prompts
    assert not any(m.training for m in model.backbone.blocks.modules())


def test_frozen_prompts_are_initialised_and_saved_but_not_tuned(tmp_path) -> None:
    model = promptvit.wrap(
        build_tiny("vit_token"), "spt", prompt_length=2, frozen_prompts=True, num_classes=4
    )
    assert model.parameter_summary()["method"] == 0
    assert not any("prompts" in n for n, _ in model.tuned_named_parameters())
    before = model.method.prompts.clone()
    model.method.initialize_from_data(model, [tiny_input("vit_token")])
    assert not torch.equal(before, model.method.prompts)
    assert torch.equal(model.tuned_state_dict()["method.prompts"], model.method.prompts)
    x = tiny_input("vit_token", seed=5)
    model.eval().save_pretrained(tmp_path / "artifact")
    loaded = promptvit.load(tmp_path / "artifact", base_model=build_tiny("vit_token")).eval()
    with torch.no_grad():
        assert torch.equal(loaded.method.prompts, model.method.prompts)
        assert torch.equal(loaded(x), model(x))


def test_vit_b16_counts_match_the_paper() -> None:
    def vit_b16():
        with torch.device("meta"):
            return timm.create_model("vit_base_patch16_224", num_classes=100)

    cls = promptvit.get_method("spt")
    deep = promptvit.wrap(vit_b16(), "spt")
    assert deep.parameter_summary()["method"] == 12 * 20 * 768 == 184_320
    shallow = promptvit.wrap(vit_b16(), "spt", prompt_length=100, deep=False)
    assert shallow.parameter_summary()["method"] == 100 * 768 == 76_800
    for model in (deep, shallow):
        assert (
            cls.expected_num_parameters(model.config, model.geometry) == model.parameter_summary()["method"]
        )


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(prompt_length=0), "prompt_length"),
        (dict(sampler="kmeans++"), "sampler"),
        (dict(max_images=0), "max_images"),
        (dict(max_kmeans_tokens=1), "max_kmeans_tokens"),
        (dict(init="uniform"), "unknown option"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(promptvit.ConfigError, match=message):
        promptvit.wrap(build_tiny("vit_token"), "spt", **options)


@pytest.mark.parametrize("layer0_tokens", ["patch_embed", "pos_embed"])
def test_layer0_tokens_before_or_after_the_position_embedding(layer0_tokens: str) -> None:
    """Official code: patch_embed output; the paper's eq. 1 (E_0 = PatchEmbed(x) + E_pos): after it."""
    base = build_tiny("vit_avg_no_cls")
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, "spt", prompt_length=3, layer0_tokens=layer0_tokens)
    x = tiny_input("vit_avg_no_cls", batch=1)
    model.method.initialize_from_data(model, [x])
    with torch.no_grad():
        patches = reference.patch_embed(x)[0]
        after = reference._pos_embed(reference.patch_embed(x))[0, reference.num_prefix_tokens :]
    assert not torch.allclose(patches, after)
    expected = patches if layer0_tokens == "patch_embed" else after
    assert_same_rows(model.method.prompts[0].detach(), expected, all_used=False)
