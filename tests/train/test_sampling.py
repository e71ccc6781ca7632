"""Training options DA-VPT's code uses, generic in the engine: the class-balanced sampler, gradient clipping by
value, stochastic depth from the backbone options."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import TensorDataset

import promptvit
from promptvit.backbones import create_backbone
from promptvit.cache import CachedBatches
from promptvit.errors import ConfigError
from promptvit.train import TrainConfig, fit
from promptvit.train.sampling import ClassBalancedBatches, balance_classes, batches_per_epoch
from tests.conftest import build_tiny


class RecordingDataset(TensorDataset):
    """A TensorDataset that remembers which items each epoch read (labels stay readable without images)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.reads: list[int] = []

    def __getitem__(self, index: int):  # type: ignore[override]
        self.reads.append(int(index))
        return super().__getitem__(index)


def _labels(counts: list[int]) -> torch.Tensor:
    return torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])


def test_every_class_is_drawn_equally_often_per_epoch() -> None:
    """Classes of 1, 3 and 8 images, batch 4 of 2 per class: 3 batches, 6 draws, 2 per class, 4 images each."""
    labels = _labels([1, 3, 8])
    batches = ClassBalancedBatches(labels.tolist(), 4, 2, torch.Generator().manual_seed(0))
    assert len(batches) == 12 // 4 and all(len(b) == 4 for b in batches)
    per_class = Counter(int(labels[i]) for batch in batches for i in batch)
    assert per_class == {0: 4, 1: 4, 2: 4}
    for batch in batches:  # the images of one draw share a class
        assert labels[batch[0]] == labels[batch[1]] and labels[batch[2]] == labels[batch[3]]
    # a class's images are used in rounds: class 1 (3 images) gives 4 picks, so no image twice before all once
    picks = [i for batch in batches for i in batch if labels[i] == 1]
    assert sorted(picks[:3]) == [1, 2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_per_class_counts_differ_by_one_draw_at_most(seed: int) -> None:
    """5 classes, 3 draws per batch of 6: 30 images give 15 draws (3 per class), 51 give 24 (4 or 5)."""
    for n in (30, 51):
        labels = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(seed))
        labels[:5] = torch.arange(5)  # every class present
        batches = ClassBalancedBatches(labels.tolist(), 6, 2, torch.Generator().manual_seed(seed))
        draws = Counter(int(labels[b[j]]) for b in batches for j in range(0, 6, 2))
        assert sum(draws.values()) == (n // 6) * 3 and max(draws.values()) - min(draws.values()) <= 1
        assert set(draws) == set(range(5))


def test_multilabel_images_count_for_their_rarest_positive_class() -> None:
    targets = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.float32)
    # positives per class: 3, 2, 1 -> rarest positive of each image, all-negative as class 3
    assert balance_classes(targets) == [1, 0, 0, 2, 3]
    assert balance_classes(torch.tensor([2, 0, 1])) == [2, 0, 1]


def test_config_refuses_a_batch_that_does_not_split_into_draws() -> None:
    with pytest.raises(ValueError, match="batch_size \\(5\\) must be a multiple of samples_per_class \\(2\\)"):
        TrainConfig(sampler="class_balanced", batch_size=5)
    assert batches_per_epoch(TrainConfig(sampler="class_balanced", batch_size=4), 3) == 1  # at least one
    assert batches_per_epoch(TrainConfig(batch_size=4), 9) == 3


def test_fit_trains_on_the_balanced_batches_of_each_epoch(tmp_path: Path) -> None:
    labels = _labels([2, 2, 8])
    images = torch.randn(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    data = RecordingDataset(images, labels)
    model = promptvit.wrap(build_tiny("vit_token", num_classes=3), "linear", solver="sgd")  # epochs, not L-BFGS
    config = TrainConfig(
        epochs=2, batch_size=4, sampler="class_balanced", device="cpu", progress=False, lr=1e-3
    )
    result = fit(model, data, None, config=config, run_dir=tmp_path, class_names=["a", "b", "c"], multilabel=False)
    assert result.history[-1]["step"] == 2 * (12 // 4)
    per_epoch = [data.reads[:12], data.reads[12:]]
    for reads in per_epoch:
        assert Counter(int(labels[i]) for i in reads) == {0: 4, 1: 4, 2: 4}
    assert per_epoch[0] != per_epoch[1]  # each epoch draws afresh from its own seed
    again = RecordingDataset(images, labels)
    fit(
        promptvit.wrap(build_tiny("vit_token", num_classes=3), "linear", solver="sgd"),
        again,
        None,
        config=config,
        run_dir=tmp_path / "again",
        class_names=["a", "b", "c"],
        multilabel=False,
    )
    assert again.reads == data.reads  # seeded


def test_cached_batches_follow_the_same_index_batches() -> None:
    outputs = torch.arange(12.0).reshape(12, 1)
    batches = ClassBalancedBatches(_labels([4, 8]).tolist(), 4, 2, torch.Generator().manual_seed(3))
    cached = list(CachedBatches(outputs, _labels([4, 8]), batch_size=4, batch_sampler=batches))
    assert [o.flatten().long().tolist() for o, _ in cached] == batches.batches


def test_a_dataset_without_cheap_labels_is_refused(tmp_path: Path) -> None:
    class Plain(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            return torch.zeros(3, 16, 16), torch.tensor(i % 2)

    model = promptvit.wrap(build_tiny("vit_token", num_classes=2), "linear", solver="sgd")
    config = TrainConfig(epochs=1, batch_size=2, sampler="class_balanced", device="cpu", progress=False)
    with pytest.raises(ConfigError, match="sampler 'class_balanced' reads the training labels"):
        fit(model, Plain(), None, config=config, run_dir=tmp_path, class_names=["a", "b"], multilabel=False)


def test_gradient_clipping_by_value_clamps_every_element(tmp_path: Path) -> None:
    """One SGD step at lr 1 moves each tuned tensor by exactly -clamp(grad, -v, v) (torch's clip_grad_value_)."""
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 30
    labels = torch.tensor([0, 1, 0, 1])
    model = promptvit.wrap(build_tiny("vit_token", num_classes=2), "bias")
    reference = copy.deepcopy(model).train()
    loss = torch.nn.functional.cross_entropy(reference(images), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in reference.tuned_named_parameters()}
    value = 0.05
    assert any(g.abs().max() > value for g in grads.values())  # the clip acts
    before = {n: p.detach().clone() for n, p in model.tuned_named_parameters()}
    config = TrainConfig(
        epochs=1, batch_size=4, lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip_value=value, device="cpu", progress=False
    )
    fit(model, TensorDataset(images, labels), None, config=config, run_dir=tmp_path, class_names=["a", "b"], multilabel=False)
    for name, parameter in model.tuned_named_parameters():
        step = parameter.detach() - before[name]
        torch.testing.assert_close(step, -grads[name].clamp(-value, value), atol=1e-6, rtol=1e-5)


def _drop_path_vit() -> torch.nn.Module:
    return create_backbone(
        "vit_tiny_patch16_224",
        num_classes=2,
        img_size=16,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        drop_path_rate=0.5,
    ).eval()


def test_stochastic_depth_from_the_backbone_options_acts_in_training_only() -> None:
    """timm's drop_path_rate puts DropPath in blocks 1-2 (linspace(0, rate, depth)); it trains with the model."""
    model = promptvit.wrap(_drop_path_vit(), "vpt", prompt_length=2, dropout=0.0)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    second = model(x)
    assert not torch.allclose(first, second)  # paths dropped at random
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    plain = promptvit.wrap(build_tiny("vit_token", num_classes=2), "vpt", prompt_length=2, dropout=0.0).train()
    torch.testing.assert_close(plain(x), plain(x))  # no drop path: deterministic


def test_the_frozen_prefix_ends_before_the_first_stochastic_block() -> None:
    linear = promptvit.wrap(_drop_path_vit(), "linear")
    assert linear.cache_cut() == 1  # block 0 has rate 0: timm builds no DropPath there
    assert promptvit.wrap(build_tiny("vit_token"), "linear").cache_cut() == 2


def test_a_family_default_drop_path_stays_off_in_a_frozen_backbone() -> None:
    """timm builds Swin with drop_path_rate 0.1: not asked for by the options, so it stays off as before."""
    from tests.families import FAMILY_BUILDS, build, family_input

    model = promptvit.wrap(build(FAMILY_BUILDS, "swin"), "linear")
    assert any(isinstance(m, timm.layers.DropPath) and m.drop_prob > 0 for m in model.backbone.modules())
    model.train()
    x = family_input(FAMILY_BUILDS, "swin")
    torch.testing.assert_close(model(x), model(x))
    assert model.cache_cut() == model.geometry.depth
