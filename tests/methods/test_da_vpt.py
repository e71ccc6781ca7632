"""DA-VPT: prompt layout, the Proxy-Anchor metric loss, the class -> prompt mapping and DA-VPT+ biases."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

import promptvit
from promptvit.methods import da_vpt
from promptvit.methods.da_vpt import (
    class_positives,
    cosine_kmeans,
    prompt_positives,
    proxy_anchor_loss,
)
from tests.conftest import build_tiny, tiny_input

ALPHA, POS, NEG = 32.0, 0.1, -0.1


def reference_loss(anchors, proxies, class_pos, mapping, scale, alpha=ALPHA, margin_pos=POS, margin_neg=NEG):
    """The spec's formula with explicit loops (float64); all-negative samples are left out."""
    num_proxies = proxies.shape[0]
    samples = [b for b in range(anchors.shape[0]) if any(class_pos[b])]
    total = 0.0
    for m in range(num_proxies):
        pos_sum, neg_sum = 0.0, 0.0
        for b in samples:
            a, p = anchors[b].double(), proxies[m].double()
            s = scale * float(a @ p / (a.norm() * p.norm()))
            positive = any(class_pos[b][c] and int(mapping[c]) == m for c in range(len(mapping)))
            if positive:
                pos_sum += math.exp(-alpha * (s - margin_pos))
            else:
                neg_sum += math.exp(alpha * (s - margin_neg))
        total += math.log(1 + pos_sum) + math.log(1 + neg_sum)  # empty sets give log(1) = 0
    return total / num_proxies


def _loss_from_parts(anchors, proxies, class_pos, mapping, scale):
    pos = prompt_positives(class_pos, mapping, proxies.shape[0])
    keep = pos.any(dim=1)
    return proxy_anchor_loss(
        anchors[keep], proxies, pos[keep], alpha=ALPHA, margin_pos=POS, margin_neg=NEG, scale=scale
    )


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_loss_matches_the_formula_single_label(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    anchors, proxies = torch.randn(6, 5, generator=g), torch.randn(3, 5, generator=g)
    targets = torch.tensor([0, 1, 1, 3, 0, 3])
    mapping = torch.tensor([0, 1, 2, 0])  # class 2 -> prompt 2 has no sample: no positives for proxy 2
    class_pos = class_positives(targets, 4)
    loss = _loss_from_parts(anchors, proxies, class_pos, mapping, scale)
    expected = reference_loss(anchors, proxies, class_pos.tolist(), mapping, scale)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_matches_the_formula_multi_label_with_an_all_negative_image() -> None:
    g = torch.Generator().manual_seed(1)
    anchors, proxies = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    targets = torch.tensor(
        [[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float32
    )
    mapping = torch.tensor([0, 1, 0, 1])  # prompt 2 has no positives in any sample
    class_pos = class_positives(targets, 4)
    loss = _loss_from_parts(anchors, proxies, class_pos, mapping, 5.0)
    expected = reference_loss(anchors, proxies, class_pos.tolist(), mapping, 5.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # every image negative: the loss is 0 and still differentiable
    none = _loss_from_parts(
        anchors, proxies.requires_grad_(), torch.zeros(5, 4, dtype=torch.bool), mapping, 5.0
    )
    none.backward()
    assert none.item() == 0.0 and torch.equal(proxies.grad, torch.zeros_like(proxies))


def test_positive_sets() -> None:
    mapping = torch.tensor([2, 0, 2, 1])
    assert prompt_positives(class_positives(torch.tensor([0, 3]), 4), mapping, 3).tolist() == [
        [False, False, True],
        [False, True, False],
    ]
    multi = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert prompt_positives(class_positives(multi, 4), mapping, 3).tolist() == [
        [True, False, True],
        [False, False, False],
    ]
    with pytest.raises(ValueError, match="multi-hot"):
        class_positives(torch.zeros(2, 3), 4)


def test_cosine_kmeans() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    data = torch.cat([a + 0.05 * torch.randn(5, 8, generator=g), b + 0.05 * torch.randn(4, 8, generator=g)])
    centroids, labels = cosine_kmeans(data, 2, generator=torch.Generator().manual_seed(3))
    assert centroids.shape == (2, 8) and torch.allclose(centroids.norm(dim=1), torch.ones(2))
    assert labels[:5].unique().numel() == 1 and labels[5:].unique().numel() == 1 and labels[0] != labels[5]
    again, labels_again = cosine_kmeans(data, 2, init=centroids)  # warm start at the fixed point
    torch.testing.assert_close(again, centroids)
    assert torch.equal(labels, labels_again)


# ------------------------------------------------------------------------------------------ the method


def wrap(kind: str = "vit_token", classes: int = 6, **options) -> promptvit.PromptModel:
    options.setdefault("prompt_length", 2)
    options.setdefault("num_proxy_prompts", 2)
    return promptvit.wrap(build_tiny(kind), "da_vpt", num_classes=classes, **options)


@pytest.mark.parametrize("kind,guided", [("vit_token", [1]), ("vit_avg", [0, 2])])
def test_prompt_layout_every_block_with_proxies_at_guided_blocks(kind: str, guided: list[int]) -> None:
    model = wrap(kind, guided_layers=guided, prompt_length=3).eval()
    depth = len(model.backbone.blocks)
    method = model.method
    others = [i for i in range(depth) if i not in guided]
    assert method.proxy_prompts.shape == (len(guided), 2, model.geometry.embed_dim)
    assert method.other_prompts.shape == (len(others), 3, model.geometry.embed_dim)
    inputs = {}
    for i, block in enumerate(model.backbone.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0]))
    with torch.no_grad(), model.all_token_outputs():  # every block runs as a module, so its hooks fire
        out = model(tiny_input(kind))
    assert out.shape == (2, 6)
    n = model.geometry.num_prefix_tokens
    for i in range(depth):
        if i in guided:
            length, prompts = 2, method.proxy_prompts[guided.index(i)]
        else:
            length, prompts = 3, method.other_prompts[others.index(i)]
        assert inputs[i].shape[1] == model.geometry.num_tokens + length
        assert torch.equal(inputs[i][:, n : n + length], prompts.expand(2, -1, -1))
    # the code's init: xavier_uniform_ on the 3-D tensor, divided by 8
    bound = math.sqrt(6 / ((len(guided) + 2) * model.geometry.embed_dim)) / 8
    assert method.proxy_prompts.abs().max() <= bound


def test_zero_prompt_length_prompts_only_the_guided_block() -> None:
    model = wrap("vit_avg", prompt_length=0, guided_layers=[1]).eval()
    assert model.method.other_prompts is None
    lengths = {}
    for i, block in enumerate(model.backbone.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: lengths.__setitem__(i, args[0].shape[1]))
    with torch.no_grad(), model.all_token_outputs():
        model(tiny_input("vit_avg"))
    assert lengths == {0: 16, 1: 18, 2: 16}
    assert model.parameter_summary()["method"] == 2 * 24


def test_few_classes_use_identity_mapping_and_m_equal_to_classes() -> None:
    model = wrap(classes=3, num_proxy_prompts=10)
    assert model.method.proxy_prompts.shape[1] == 3
    assert model.method.class_to_prompt.tolist() == [0, 1, 2]
    info = model.method.initialize_from_data(model, [(tiny_input("vit_token"), torch.tensor([0, 1]))])
    assert info["mapping_init"] == "identity" and info["init_images"] == 0
    model.train()
    model(tiny_input("vit_token"))
    model.method.auxiliary_loss(model, torch.tensor([0, 2]))
    assert model.method.on_epoch_end(model, 1)["mapping"] == "0:0 1:1 2:2"


def _class_images(pattern: str, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if pattern == "bright":
        return 3.0 + 0.1 * torch.randn(batch, 3, 16, 16, generator=g)
    x = torch.zeros(batch, 3, 16, 16)
    x[:, :, ::2] = -3.0
    return x + 0.1 * torch.randn(batch, 3, 16, 16, generator=g)


def _patterned_batch(classes_bright: set[int], classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    targets = torch.arange(classes).repeat(2)
    images = torch.cat(
        [_class_images("bright" if int(t) in classes_bright else "striped", 1) for t in targets]
    )
    return images, targets


def _partition(mapping: torch.Tensor) -> set[frozenset[int]]:
    return {frozenset(int(c) for c in (mapping == m).nonzero().flatten()) for m in mapping.unique()}


def test_initial_mapping_is_cosine_kmeans_of_class_means_of_the_frozen_model() -> None:
    model = wrap(classes=6, init_images_per_class=2, seed=4)
    reference = copy.deepcopy(build_tiny("vit_token"))
    reference.reset_classifier(6)
    images, targets = _patterned_batch({0, 2, 4})
    info = model.method.initialize_from_data(model, [(images[:5], targets[:5]), (images[5:], targets[5:])])
    assert info["mapping_init"] == "kmeans" and info["init_images"] == 12
    assert _partition(model.method.class_to_prompt) == {frozenset({0, 2, 4}), frozenset({1, 3, 5})}
    with torch.no_grad():
        features = reference.forward_head(reference.forward_features(images), pre_logits=True)
    means = torch.stack([features[targets == c].mean(0) for c in range(6)])
    centroids, labels = cosine_kmeans(means, 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(model.method.class_to_prompt, labels)
    torch.testing.assert_close(model.method.centroids, centroids)


def test_initial_mapping_stops_pulling_once_every_class_has_its_images() -> None:
    model = wrap(classes=6, init_images_per_class=1)
    images, targets = _patterned_batch({0, 1, 2})
    pulled = []

    def stream():
        for s in range(100):
            pulled.append(s)
            yield images[:6], targets[:6]

    info = model.method.initialize_from_data(model, stream())
    assert len(pulled) == 1 and info["init_images"] == 6


def test_without_labels_the_mapping_waits_for_the_first_epoch() -> None:
    model = wrap(classes=6)
    info = model.method.initialize_from_data(model, [tiny_input("vit_token")])  # images only
    assert info["mapping_init"].startswith("c mod M")
    assert model.method.class_to_prompt.tolist() == [0, 1, 0, 1, 0, 1]


def _epoch(model, batches) -> None:
    model.train()
    for images, targets in batches:
        model(images)
        model.method.auxiliary_loss(model, targets)


def test_mapping_is_recomputed_after_each_epoch_warm_started(monkeypatch) -> None:
    model = wrap(classes=6)
    model.method.initialize_from_data(model, [_patterned_batch({0, 2, 4})])
    assert _partition(model.method.class_to_prompt) == {frozenset({0, 2, 4}), frozenset({1, 3, 5})}
    previous = model.method.centroids.clone()
    calls = []
    original = da_vpt.cosine_kmeans

    def spy(data, k, **kwargs):
        calls.append(kwargs["init"].clone())
        return original(data, k, **kwargs)

    monkeypatch.setattr(da_vpt, "cosine_kmeans", spy)
    _epoch(model, [_patterned_batch({0, 1, 2})])  # now classes 0-2 look alike
    info = model.method.on_epoch_end(model, 1)
    assert len(calls) == 1 and torch.equal(calls[0], previous)  # warm start from the previous centroids
    assert info["mapping_updated"] == 1 and info["mapping_changed"] > 0
    assert _partition(model.method.class_to_prompt) == {frozenset({0, 1, 2}), frozenset({3, 4, 5})}
    mapping = model.method.class_to_prompt.tolist()
    assert info["mapping"] == " ".join(f"{c}:{m}" for c, m in enumerate(mapping))
    assert info["class_prompt"] == dict(enumerate(mapping))
    assert not torch.equal(model.method.centroids, previous)
    assert info["beta"] == 0.05 and info["lam"] == 0.05 and info["loss_patch"] > 0 and info["loss_cls"] > 0
    # the running statistics start again: an epoch without steps keeps the mapping
    again = model.method.on_epoch_end(model, 2)
    assert again["mapping_updated"] == 0 and "loss_patch" not in again


def test_classes_not_seen_in_the_epoch_keep_their_prompt_and_collapse_is_skipped() -> None:
    model = wrap(classes=6)
    model.method.initialize_from_data(model, [_patterned_batch({0, 2, 4})])
    before = model.method.class_to_prompt.clone()
    same = _class_images("bright", 4)
    _epoch(model, [(same, torch.tensor([0, 1, 2, 3]))])  # identical means: one cluster
    info = model.method.on_epoch_end(model, 1)
    assert info["mapping_updated"] == 0 and torch.equal(model.method.class_to_prompt, before)


def test_mapping_update_can_start_later() -> None:
    model = wrap(classes=6, update_mapping_from_epoch=3)
    model.method.initialize_from_data(model, [_patterned_batch({0, 2, 4})])
    _epoch(model, [_patterned_batch({0, 1, 2})])
    assert model.method.on_epoch_end(model, 1)["mapping_updated"] == 0


def _record_guided(model, block: int) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    blk = getattr(model, "backbone", model).blocks[block]
    blk.norm1.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0]))  # the block's input
    blk.attn.qkv.register_forward_hook(lambda m, args, out: seen.__setitem__("qkv", out))
    blk.attn.proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("attn", args[0]))
    return seen


@pytest.mark.parametrize("anchor", ["patch_mean", "prompt_attn_out"])
def test_auxiliary_loss_is_the_formula_on_the_hooked_activations(anchor: str) -> None:
    model = wrap(classes=4, num_proxy_prompts=3, anchor=anchor, beta=0.3, lam=0.7)
    model.method.class_to_prompt.copy_(torch.tensor([0, 1, 2, 0]))
    seen = _record_guided(model, 1)
    targets = torch.tensor([0, 1, 3, 3])  # prompt 2 has no positive
    model.train()
    model(tiny_input("vit_token", batch=4))
    loss = model.method.auxiliary_loss(model, targets)
    n, m, d = 1, 3, 32
    proxies = model.method.proxy_prompts[0].detach()
    if anchor == "patch_mean":
        anchors = seen["input"][:, n + m :].mean(1)  # mean of the block-input image tokens
    else:
        mapped = model.method.class_to_prompt[targets]
        anchors = seen["attn"][torch.arange(4), n + mapped]  # MHSA output at the class's prompt
    cls_query = seen["qkv"][:, 0, :d]  # W_q LN1(x_cls) + b_q
    class_pos = class_positives(targets, 4).tolist()
    mapping = model.method.class_to_prompt
    expected = 0.3 * reference_loss(
        anchors.detach(), proxies, class_pos, mapping, 5.0
    ) + 0.7 * reference_loss(cls_query.detach(), proxies, class_pos, mapping, 5.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert model.method.auxiliary_loss(model, targets) is None  # consumed


def test_auxiliary_loss_averages_over_guided_layers_and_skips_cls_without_class_token() -> None:
    model = wrap("vit_avg", classes=4, guided_layers=[1, 2], beta=1.0, lam=1.0)
    model.train()
    model(tiny_input("vit_avg", batch=3))
    targets = torch.tensor([0, 1, 2])
    captured = {k: v.detach() for k, v in model.method._captured.items()}
    loss = model.method.auxiliary_loss(model, targets)
    assert not any(key[0] == "cls" for key in captured if isinstance(key, tuple))  # no CLS: no L_cls
    pos = class_positives(targets, 4).tolist()
    mapping = model.method.class_to_prompt
    proxies = model.method.proxy_prompts.detach()
    expected = (
        sum(reference_loss(captured[("patch", g)], proxies[g], pos, mapping, 5.0) for g in range(2)) / 2
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_no_loss_in_eval_mode_or_without_a_forward() -> None:
    model = wrap()
    targets = torch.tensor([0, 1])
    model.train()
    assert model.method.auxiliary_loss(model, targets) is None
    model.eval()
    with torch.no_grad():
        model(tiny_input("vit_token"))
    assert model.method.auxiliary_loss(model, targets) is None
    assert wrap(beta=0.0, lam=0.0).method.auxiliary_loss(model, targets) is None


def test_multi_label_targets_with_all_negative_images() -> None:
    model = wrap(classes=5)
    model.train()
    model(tiny_input("vit_token", batch=3))
    targets = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.float32)
    loss = model.method.auxiliary_loss(model, targets)
    assert torch.isfinite(loss)
    loss.backward()
    model.zero_grad()
    model(tiny_input("vit_token", batch=2))
    nothing = model.method.auxiliary_loss(model, torch.zeros(2, 5))
    assert nothing.item() == 0.0
    nothing.backward()
    assert (
        model.method.on_epoch_end(model, 1)["mapping_updated"] == 1
    )  # the means came from the labelled images


def _grads(model) -> dict[str, torch.Tensor | None]:
    """Gradients by state-dict name, and of the tuned tensors by artifact key too."""
    return {
        **{n: p.grad for n, p in model.named_parameters()},
        **{n: p.grad for n, p in model.tuned_named_parameters()},
    }


def test_aux_gradients_reach_the_prompts_only() -> None:
    model = wrap(classes=4)
    model.train()
    model(tiny_input("vit_token", batch=4))
    model.method.auxiliary_loss(model, torch.tensor([0, 1, 2, 3])).backward()
    grads = _grads(model)
    assert grads["method.proxy_prompts"].abs().sum() > 0
    assert grads["method.other_prompts"].abs().sum() > 0  # through the anchors of the guided block
    assert grads["backbone.head.weight"] is None  # pre-logit features are only statistics
    assert all(g is None for n, g in grads.items() if n.startswith("backbone.blocks"))


def test_kv_bias_deltas_get_gradients_and_q_stays_frozen() -> None:
    base = build_tiny("vit_token")
    reference = copy.deepcopy(base)
    reference.reset_classifier(4)
    model = promptvit.wrap(
        base,
        "da_vpt",
        num_classes=4,
        prompt_length=2,
        num_proxy_prompts=2,
        bias_set="kv",
        anchor="prompt_attn_out",
    )
    delta = model.method.kv_bias_delta
    assert delta.shape == (2, 2 * 32) and delta.requires_grad
    model.train()
    model(tiny_input("vit_token", batch=4))
    model.method.auxiliary_loss(model, torch.tensor([0, 1, 2, 3])).backward()
    grads = _grads(model)
    assert (
        delta.grad.abs().sum(dim=1) > 0
    ).all()  # both blocks (the guided one through the attention output)
    assert all(
        g is None for n, g in grads.items() if n.startswith("backbone.blocks")
    )  # qkv weight, bias (Q) too
    # the delta moves exactly the K and V parts of the fused qkv output
    with torch.no_grad():
        delta.normal_()
    seen_model = _record_guided(model, 0)
    seen_ref = _record_guided(reference, 0)
    model.eval()
    x = tiny_input("vit_token")
    with torch.no_grad(), model.method.without_token_prompts():
        model(x)
        reference(x)
    out, ref = seen_model["qkv"], seen_ref["qkv"]
    assert torch.equal(out[..., :32], ref[..., :32])
    torch.testing.assert_close(out[..., 32:], ref[..., 32:] + delta[0])


def test_full_released_trainable_set() -> None:
    model = wrap(classes=4, bias_set="full_released")
    tuned = {n for n, _ in model.tuned_named_parameters()}
    per_block = {"norm1.weight", "norm1.bias", "attn.proj.bias", "norm2.bias", "mlp.fc2.bias"}
    expected = {f"backbone.blocks.{i}.{p}" for i in range(2) for p in per_block}
    expected |= {"backbone.cls_token", "method.kv_bias_delta", "method.proxy_prompts", "method.other_prompts"}
    expected |= {"backbone.head.weight", "backbone.head.bias"}
    assert tuned == expected
    assert "backbone.blocks.0.attn.qkv.bias" not in tuned


@pytest.mark.parametrize(
    "options,expected",
    [
        ({}, 10 * 768 + 11 * 10 * 768),
        ({"bias_set": "kv"}, 10 * 768 + 11 * 10 * 768 + 12 * 2 * 768),
        ({"bias_set": "full_released"}, 10 * 768 + 11 * 10 * 768 + 12 * 7 * 768 + 768),
        ({"guided_layers": [10, 11], "num_proxy_prompts": 20, "prompt_length": 0}, 2 * 20 * 768),
    ],
)
def test_vit_b16_parameter_counts(options: dict, expected: int) -> None:
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", num_classes=100)
    model = promptvit.wrap(vit, "da_vpt", **options)
    assert model.parameter_summary()["method"] == expected
    assert promptvit.get_method("da_vpt").expected_num_parameters(model.config, model.geometry) == expected
    if options.get("bias_set") == "full_released":  # the released configs free ~64k parameters of ViT-B
        assert expected - (10 * 768 + 11 * 10 * 768) == 65_280


def test_spt_prompt_init_uses_the_tokens_of_each_block() -> None:
    base = build_tiny("vit_avg")
    reference = copy.deepcopy(base)
    model = promptvit.wrap(
        base, "da_vpt", num_classes=4, prompt_length=16, num_proxy_prompts=4, prompt_init="spt"
    )
    x = tiny_input("vit_avg", batch=1)
    info = model.method.initialize_from_data(model, [(x, torch.tensor([1]))])
    assert info["spt_images"] == 1 and info["spt_tokens"] == 3 * 16
    tokens = {}
    for i in (1, 2):
        reference.blocks[i].register_forward_pre_hook(lambda m, args, i=i: tokens.__setitem__(i, args[0][0]))
    reference.patch_embed.register_forward_hook(lambda m, args, out: tokens.__setitem__(0, out[0]))
    with torch.no_grad():
        reference(x)
    for layer in (0, 1):
        prompts = model.method.other_prompts[layer].detach()  # 16 prompts = all 16 tokens
        assert torch.equal(prompts[torch.cdist(prompts, tokens[layer]).argmin(0)], tokens[layer])
    proxies = model.method.proxy_prompts[0].detach()
    index = torch.cdist(proxies, tokens[2]).argmin(1)
    assert index.unique().numel() == 4 and torch.equal(proxies, tokens[2][index])


def test_deepcopy_after_a_training_forward_and_state_round_trip(tmp_path) -> None:
    model = wrap(classes=6)
    model.method.initialize_from_data(model, [_patterned_batch({0, 2, 4})])
    model.train()
    model(tiny_input("vit_token"))  # captured activations hold a graph
    clone = copy.deepcopy(model)
    assert clone.method._captured == {} and model.method._captured
    model.eval().save_pretrained(tmp_path / "artifact")
    loaded = promptvit.load(tmp_path / "artifact", base_model=build_tiny("vit_token"))
    assert torch.equal(loaded.method.class_to_prompt, model.method.class_to_prompt)
    assert torch.equal(loaded.method.centroids, model.method.centroids)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(prompt_length=-1), "prompt_length"),
        (dict(num_proxy_prompts=0), "num_proxy_prompts"),
        (dict(guided_layers=[5]), "layers"),
        (dict(guided_layers=[-3]), r"layers \[-3\] do not exist; .* \(or -2..-1\)"),
        (dict(guided_layers=[-1, 1]), "name the same block twice"),
        (dict(guided_layers=[]), "layers"),
        (dict(prompt_norm="layer"), "prompt_norm"),
        (dict(anchor="cls"), "anchor"),
        (dict(bias_set="all"), "bias_set"),
        (dict(beta=-1.0), "beta"),
        (dict(prompt_init="normal"), "prompt_init"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(promptvit.ConfigError, match=message):
        wrap(**options)


# ------------------------------------------------- the released CUB config: prompt norm (vpt_norm) and mask


def authors_forward(model, images: torch.Tensor, *, norm: bool, mask: bool):
    """DA-VPT's PromptVisionTransformer.forward_features written out on the tiny ViT (models/vpt.py + attn.py).

    Before every block the input is rebuilt as ``[x_cls, vpt_norm(prompts_l), x_img]`` (``vpt_norm`` l2:
    ``F.normalize(p, dim=-1, eps=1e-6)``); with ``mask`` the scaled logits of rows ``1..L`` get -inf on columns
    ``0..L`` (CLS and prompts). Returns the logits (final norm, CLS, head) and each block's pre-projection
    attention output.
    """
    backbone, method = model.backbone, model.method
    x = backbone._pos_embed(backbone.patch_embed(images))
    num_img = x.shape[1] - 1
    attn_outs = []
    for index, blk in enumerate(backbone.blocks):
        if index in method.guided:
            prompts = method.proxy_prompts[method.guided.index(index)]
        else:
            prompts = method.other_prompts[method.others.index(index)]
        if norm:
            prompts = torch.nn.functional.normalize(prompts, dim=-1, eps=1e-6)
        x = torch.cat([x[:, :1], prompts.expand(x.shape[0], -1, -1), x[:, -num_img:]], dim=1)
        batch, tokens, dim = x.shape
        heads = blk.attn.num_heads
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        logits = (q @ k.transpose(-2, -1)) * blk.attn.scale
        length = prompts.shape[0]
        if mask:
            logits[:, :, 1 : 1 + length, 0 : 1 + length] = float("-inf")
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        attn_outs.append(out)
        x = x + blk.attn.proj(out)
        x = x + blk.mlp(blk.norm2(x))
    return backbone.head(backbone.norm(x)[:, 0]), attn_outs


def _scaled_prompts(model, factor: float) -> None:
    with torch.no_grad():
        for tensor in (model.method.proxy_prompts, model.method.other_prompts):
            tensor.mul_(factor)


@pytest.mark.parametrize("norm,mask", [(False, False), (True, False), (False, True), (True, True)])
def test_prompt_norm_and_mask_match_the_authors_forward(norm: bool, mask: bool) -> None:
    model = wrap(prompt_length=3, guided_layers=[1], prompt_norm="l2" if norm else "none", prompt_mask=mask)
    _scaled_prompts(model, 40.0)  # far from unit norm
    images = tiny_input("vit_token", batch=3)
    inputs = {}
    for i, block in enumerate(model.backbone.blocks):  # the block's input (a row-selected block is no module call)
        block.norm1.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
    model.eval()
    with torch.no_grad():
        expected, _ = authors_forward(model, images, norm=norm, mask=mask)
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
        # the mask changes only the prompts' own rows, which every block replaces: the logits do not move
        torch.testing.assert_close(authors_forward(model, images, norm=norm, mask=not mask)[0], expected)
        _scaled_prompts(model, 1e-4)  # tiny prompts: LayerNorm's epsilon makes their scale (hence the norm) count
        small, _ = authors_forward(model, images, norm=norm, mask=mask)
        torch.testing.assert_close(model(images), small, rtol=1e-5, atol=1e-5)
        assert torch.allclose(small, expected, atol=1e-4) is norm
    rows = [inputs[0][:, 1:4].norm(dim=-1), inputs[1][:, 1:3].norm(dim=-1)]  # 3 prompts, then 2 proxies
    assert all(torch.allclose(r, torch.ones_like(r)) for r in rows) is norm


def test_l2_prompts_get_gradients_tangent_to_their_sphere() -> None:
    """Through p / |p| the model depends on a prompt's direction only, so every gradient is orthogonal to it.

    Without the norm the prompt still enters through LayerNorm (scale-free but for its epsilon): small prompts,
    whose variance is near the epsilon, then get radial gradients too.
    """
    for norm, tangent in (("l2", True), ("none", False)):
        model = wrap(classes=4, num_proxy_prompts=3, prompt_norm=norm, beta=0.0, lam=0.0).train()
        _scaled_prompts(model, 0.01)  # per-element variance ~3e-8, below LayerNorm's epsilon (1e-6)
        targets = torch.tensor([0, 1, 2, 3])
        torch.nn.functional.cross_entropy(model(tiny_input("vit_token", batch=4)), targets).backward()
        for tensor in (model.method.proxy_prompts, model.method.other_prompts):
            radial = (tensor.grad * tensor.detach()).sum(-1) / tensor.detach().norm(dim=-1)
            ratio = radial.abs().max() / tensor.grad.norm(dim=-1).max()
            assert bool(ratio < 1e-5) is tangent and (tangent or ratio > 0.05), (norm, float(ratio))


@pytest.mark.parametrize("mask", [False, True])
def test_the_paper_anchor_reads_the_masked_prompt_rows(mask: bool) -> None:
    """anchor="prompt_attn_out": the attention output at the guided prompts, over patches only with the mask."""
    model = wrap(
        classes=4, num_proxy_prompts=3, guided_layers=[1], anchor="prompt_attn_out", prompt_norm="l2", prompt_mask=mask
    )
    images = tiny_input("vit_token", batch=4)
    model.train()
    model(images)
    captured = model.method._captured[("attn", 0)].detach()
    with torch.no_grad():
        _, attn_outs = authors_forward(model, images, norm=True, mask=mask)
    torch.testing.assert_close(captured, attn_outs[1][:, 1:4], rtol=1e-5, atol=1e-6)
    _, unmasked = authors_forward(model, images, norm=True, mask=not mask)
    assert not torch.allclose(captured, unmasked[1][:, 1:4].detach(), atol=1e-4)


def test_l2_prompts_make_logits_and_loss_blind_to_the_prompt_scale() -> None:
    model = wrap(classes=4, num_proxy_prompts=3, prompt_norm="l2", beta=1.0, lam=1.0).train()
    images, targets = tiny_input("vit_token", batch=4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    logits, loss = model(images), model.method.auxiliary_loss(model, targets)
    _scaled_prompts(model, 7.0)
    torch.testing.assert_close(model(images), logits, rtol=1e-5, atol=1e-5)
    assert model.method.auxiliary_loss(model, targets).item() == pytest.approx(loss.item(), rel=1e-5)
    inserted = model.method.block_prompts(1, images)  # what block 1 receives: unit rows
    torch.testing.assert_close(inserted.norm(dim=-1), torch.ones(4, 3))


def test_prompt_mask_is_refused_where_attention_is_not_plain_softmax() -> None:
    from tests.families import FAMILY_BUILDS, build

    names = [n for n in ("eva02", "vit_rope") if n in FAMILY_BUILDS]
    if not names:
        pytest.skip("no rotary-position family in this timm version")
    with pytest.raises(promptvit.ConfigError, match="prompt_mask recomputes the prompt rows of plain softmax .* off"):
        promptvit.wrap(build(FAMILY_BUILDS, names[0]), "da_vpt", prompt_length=2, num_proxy_prompts=2, prompt_mask=True)
    promptvit.wrap(build(FAMILY_BUILDS, names[0]), "da_vpt", prompt_length=2, num_proxy_prompts=2)  # unmasked is fine


def test_negative_guided_layers_count_from_the_last_block() -> None:
    model = wrap("vit_avg", guided_layers=[-1])  # 3 blocks
    assert model.method.guided == [2] and model.method.others == [0, 1]
    lora = promptvit.wrap(build_tiny("vit_avg"), "lora", layers=[-2, -1])
    assert model.method.guided == [2] and lora.method.tuned_from_block() == 1
