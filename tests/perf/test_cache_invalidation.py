"""Cache keys change with the prefix weights, the transform and the images; random augmentation is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

import promptvit
from promptvit.cache import CacheError, PrefixCache, check_deterministic, item_keys
from promptvit.train import TrainConfig, fit
from tests.families import build_tiny
from tests.perf.helpers import CLASSES, folder_dataset, write_pngs


def _model(method: str = "ept", seed: int = 0, **options) -> promptvit.PromptModel:
    if method == "ept" and not options:
        options = {"layers": [1, 2], "prompt_length": 3}
    return promptvit.wrap(build_tiny("vit_avg_no_cls", num_classes=4, seed=seed), method, **options)


def test_prefix_key_follows_the_prefix_weights_only() -> None:
    cache = PrefixCache()
    model = _model()
    key = cache.prefix_key(model, 1)
    assert cache.prefix_key(_model(), 1) == key  # same weights, fresh model
    assert cache.prefix_key(_model(seed=1), 1) != key  # other backbone weights
    assert cache.prefix_key(model, 2) != key  # other cut
    # a method with the same cut on the same backbone shares the key
    assert cache.prefix_key(_model("ap", layer=1), 1) == key
    with torch.no_grad():
        model.backbone.blocks[2].mlp.fc1.weight.add_(1.0)  # after the cut: irrelevant
    assert cache.prefix_key(model, 1) == key
    with torch.no_grad():
        model.backbone.blocks[0].mlp.fc2.bias[3] += 1e-3  # one value inside the prefix
    assert cache.prefix_key(model, 1) != key
    # features (cut == depth): linear and mlp share, the head does not count
    linear, mlp = _model("linear"), _model("mlp")
    assert cache.prefix_key(linear, 3) == cache.prefix_key(mlp, 3)


def test_changed_weights_are_recomputed_not_served_from_the_cache(tmp_path: Path) -> None:
    data = TensorDataset(torch.randn(6, 3, 16, 16), torch.arange(6) % 4)
    cache = PrefixCache(tmp_path)
    model = _model()
    first, _ = cache.prefix_outputs(model, data, 1)
    with torch.no_grad():
        model.backbone.patch_embed.proj.weight.mul_(1.5)
    second, _ = cache.prefix_outputs(model, data, 1)
    assert cache.stats["computed"] == 12
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        assert torch.equal(second, model.forward_prefix(data.tensors[0], 1))


def test_item_keys_follow_transform_and_images(tmp_path: Path) -> None:
    paths = write_pngs(tmp_path / "img", 4)
    keys = item_keys(folder_dataset(paths))
    assert len(set(keys)) == 4 and item_keys(folder_dataset(paths)) == keys
    # another transform (other normalisation) -> other keys
    other = folder_dataset(paths, train=False)
    other.transform.transforms[-1].mean = (0.4, 0.5, 0.5)
    assert item_keys(other) != keys
    # rewriting one image (new mtime/size) changes that image's key only
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(paths[2])
    stat = os.stat(paths[2])
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = item_keys(folder_dataset(paths))
    assert [a == b for a, b in zip(keys, changed, strict=True)] == [True, True, False, True]
    # subsets map to the underlying items; tensors are keyed by content
    assert item_keys(Subset(folder_dataset(paths), [3, 1])) == [changed[3], changed[1]]
    images = torch.randn(3, 3, 16, 16)
    tensor_keys = item_keys(TensorDataset(images, torch.zeros(3)))
    images[1, 0, 0, 0] += 1
    assert [
        a == b for a, b in zip(tensor_keys, item_keys(TensorDataset(images, torch.zeros(3))), strict=True)
    ] == [
        True,
        False,
        True,
    ]


def test_a_changed_image_file_is_recomputed_on_disk(tmp_path: Path) -> None:
    paths = write_pngs(tmp_path / "img", 5)
    model = _model()
    PrefixCache(tmp_path / "cache").prefix_outputs(model, folder_dataset(paths), 1)
    Image.fromarray(np.full((20, 20, 3), 7, dtype=np.uint8)).save(paths[0])
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    cache = PrefixCache(tmp_path / "cache")
    outputs, targets = cache.prefix_outputs(model, folder_dataset(paths), 1)
    assert cache.stats == {"memory_hits": 0, "disk_hits": 4, "computed": 1}
    dataset = folder_dataset(paths)
    images = torch.stack([dataset[i][0] for i in range(5)])
    model.eval()
    with torch.no_grad():
        assert torch.equal(outputs, model.forward_prefix(images, 1))
    assert targets.tolist() == [0, 1, 2, 3, 0]
    # another transform: all recomputed
    other = folder_dataset(paths)
    other.transform.transforms[-1].std = (0.25, 0.5, 0.5)
    cache.prefix_outputs(model, other, 1)
    assert cache.stats["computed"] == 6


class _Noisy(Dataset):
    """Random augmentation the name check cannot see (a lambda-like callable); the probe must catch it."""

    def __init__(self) -> None:
        self.images = torch.randn(4, 3, 16, 16)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return self.images[index] + 0.1 * torch.randn(3, 16, 16), index % 4


def test_random_augmentation_without_cache_views_is_refused(tmp_path: Path) -> None:
    paths = write_pngs(tmp_path / "img", 8)
    train = folder_dataset(paths, train=True)  # RandomResizedCrop + RandomHorizontalFlip
    with pytest.raises(
        CacheError, match=r"random steps \(RandomHorizontalFlip, RandomResizedCrop\).*cache_views"
    ):
        check_deterministic(train)
    with pytest.raises(CacheError, match="two different images"):
        check_deterministic(_Noisy())
    check_deterministic(folder_dataset(paths))  # eval transforms: fine
    config = TrainConfig(epochs=1, progress=False, cache_prefix=True)
    with pytest.raises(CacheError, match="cache_views"):
        fit(
            _model(),
            train,
            None,
            config=config,
            run_dir=tmp_path / "run",
            multilabel=False,
            class_names=CLASSES,
        )
    assert not (tmp_path / "run" / "checkpoint").exists()
    with pytest.raises(ValueError, match="cache_prefix"):
        TrainConfig(cache_views=2)
    # a randomly augmented validation set is refused before training starts, even with cache_views
    views = TrainConfig(epochs=1, progress=False, cache_prefix=True, cache_views=2)
    with pytest.raises(CacheError, match="random steps"):
        fit(
            _model(),
            train,
            train,
            config=views,
            run_dir=tmp_path / "v",
            multilabel=False,
            class_names=CLASSES,
        )
    assert not (tmp_path / "v" / "checkpoint").exists()


def test_cache_views_cycle_over_fixed_augmented_views(tmp_path: Path) -> None:
    paths = write_pngs(tmp_path / "img", 6)
    train = folder_dataset(paths, train=True)
    cache = PrefixCache()
    config = TrainConfig(epochs=3, lr=0.05, progress=False, cache_prefix=True, cache_views=2, batch_size=3)
    model = _model()
    fit(
        model,
        train,
        None,
        config=config,
        run_dir=tmp_path / "run",
        multilabel=False,
        class_names=CLASSES,
        prefix_cache=cache,
    )
    # epochs 1, 2 compute views 0 and 1; epoch 3 reuses view 0
    assert cache.stats == {"memory_hits": 6, "disk_hits": 0, "computed": 12}
    view0, _ = cache.prefix_outputs(model, train, 1, view=0)
    view1, _ = cache.prefix_outputs(model, train, 1, view=1)
    assert not torch.equal(view0, view1)
    # views are reproducible: a fresh cache draws the same view 0
    again, _ = PrefixCache().prefix_outputs(model, train, 1, view=0)
    assert torch.equal(view0, again)


def test_cache_views_need_item_identities() -> None:
    with pytest.raises(CacheError, match="item identities"):
        PrefixCache().prefix_outputs(_model(), _Noisy(), 1, view=0)
