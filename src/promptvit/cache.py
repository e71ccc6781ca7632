"""Frozen-prefix caching: compute the frozen part of a forward once per image and reuse it.

A method's ``tuned_from_block()`` (see :class:`promptvit.methods.base.Method`) says where the tuned part of
the network starts. Everything before that cut ``l`` (``patch_embed -> _pos_embed -> patch_drop -> norm_pre
-> blocks[:l]``, or for ``l == depth`` the whole feature extractor up to the pre-logit features) is frozen
and runs in eval mode, so for a deterministic input its output never changes. :class:`PrefixCache` stores
those outputs per image, in memory and optionally on disk, and hands them back as one ``(N, ...)`` tensor
in dataset order; ``PromptModel.forward_from_block`` then finishes the forward. Linear probing and MLP
heads then cost a head forward per step; partial-1 one block; EPT/AP/LoRA/adapters on later blocks only
the blocks from their first tuned block.

Keys. An entry is found under ``(prefix key, item key)``:

* the *prefix key* hashes what computes the prefix: the cut ``l``, the backbone geometry (architecture,
  image size, pooling...), the ``repr`` of the prefix modules (layer options such as norm eps), a full hash
  of every parameter and buffer of the prefix (``blocks[:l]`` and the embedding, or all but the classifier
  for ``l == depth``), their dtype, the autocast dtype (CUDA), the device type and the torch version. Different weights (even
  of one prefix block), another cut or another torch give another key. Weights after the cut do not enter,
  so two methods with the same cut on one backbone share entries (e.g. EPT from block 1 and AP at layer 1),
  and a linear and an MLP probe share the features. Caches are keyed by cut: a cut-3 cache is not derived
  from a cut-2 cache (documented simplification);
* the *item key* identifies the model input: for :class:`promptvit.data.ImageDataset` items, the file path
  + size + modification time (or, for array-backed sources, the array row's shape, dtype and content hash)
  plus the ``repr`` of the transform pipeline (which lists every step's parameters) and the torch,
  torchvision and PIL versions; for ``TensorDataset`` items the content hash of the image tensor; for
  ``Subset`` the underlying dataset's keys. Any other dataset is loaded item by item and keyed by the content
  hash of the transformed image tensor it returns (exact, but loads every image on every use). A dataset may
  also define ``prefix_cache_keys() -> list[str]`` (stable per-item identities that include its transform).

Determinism. Caching is only valid when the dataset returns the same tensor for the same index every time.
:func:`check_deterministic` refuses datasets whose transform contains a known random step (``Random*``,
``ColorJitter``, ``RandAugment``...) and, as a probe, loads the first item twice under different seeds.
With random augmentation, ``views=v`` caches fixed augmented *views*: view ``v`` of an item is drawn with
the torch, Python and NumPy generators seeded from (item key, v), so views are reproducible and shared across
runs, seeds and methods (the engine's ``cache_views=n`` makes epoch ``e`` use view ``(e - 1) mod n``).
Views need item keys (not the content-hash fallback).

Storage. In memory, entries are CPU tensors (views into the computed batch). On disk (``directory``), each
entry is one safetensors file ``directory/<prefix key>/<2 hex>/<item hash>.safetensors`` written atomically;
``directory/<prefix key>/prefix.json`` describes the prefix. Memory use is ``N * tokens * width * 4`` bytes
per cached dataset and cut (pre-logit features: ``N * width * 4``). Delete the folder to clear the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from promptvit.backbones import adapter_for, classifier_name
from promptvit.errors import CacheError

logger = logging.getLogger(__name__)

PREFIX_FILE = "prefix.json"
CACHE_FORMAT = 1

#: transform class names that draw random numbers (torchvision v1/v2, timm); ``Random*`` is matched too
RANDOM_TRANSFORMS = frozenset(
    {
        "ColorJitter",
        "RandAugment",
        "AutoAugment",
        "TrivialAugmentWide",
        "AugMix",
        "GaussianBlur",
        "GaussianNoise",
        "ElasticTransform",
        "MixUp",
        "CutMix",
        "ScaleJitter",
        "RandomShortestSize",
        "RandomResize",
    }
)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary file beside ``path`` and rename it over ``path`` (no fsync: a cache may be lost)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- hashing


def _hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    if tensor.numel():
        data = tensor.to("cpu").contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        digest.update(data.reshape(-1).numpy().tobytes())


def tensor_hash(tensor: torch.Tensor) -> str:
    """Full content hash (shape, dtype, bytes) of a tensor."""
    digest = hashlib.blake2b(digest_size=16)
    _hash_tensor(digest, tensor)
    return digest.hexdigest()


def _array_hash(array: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    array = np.ascontiguousarray(array)
    digest.update(f"{array.shape}{array.dtype}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _short(text: str, size: int = 20) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def _key_of(description: dict[str, Any]) -> str:
    """The prefix key of a :meth:`PrefixCache.describe_prefix` description."""
    return _short(json.dumps(description, sort_keys=True), 16)


def _versions() -> str:
    import PIL
    import torchvision

    return f"torch={torch.__version__},torchvision={torchvision.__version__},PIL={PIL.__version__}"


# -------------------------------------------------------------------------------- prefix identity


def prefix_tensors(model: nn.Module, cut: int) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the backbone that determine ``model.forward_prefix(x, cut)``."""
    backbone = model.backbone
    depth = model.geometry.depth
    named = {**dict(backbone.named_parameters()), **dict(backbone.named_buffers())}
    if cut == depth:
        head = classifier_name(backbone).split(".")[0]
        return {n: t for n, t in named.items() if n.split(".")[0] != head}
    stem, blocks = adapter_for(backbone).prefix_state_names(cut)
    return {n: t for n, t in named.items() if n.startswith(stem) or n.startswith(blocks)}


def _prefix_modules_repr(model: nn.Module, cut: int) -> str:
    backbone = model.backbone
    if cut == model.geometry.depth:
        head = classifier_name(backbone).split(".")[0]
        return "\n".join(f"{n}: {m!r}" for n, m in backbone.named_children() if n != head)
    return "\n".join(repr(m) for m in adapter_for(backbone).prefix_modules(cut))


class _FingerprintMemo:
    """Full hashes of prefix tensors, recomputed only when a tensor changes (storage or version counter)."""

    def __init__(self) -> None:
        # id(tensor) -> (weak reference, storage pointer, version counter, hash); an entry is only trusted
        # while its tensor object is alive and unchanged (a freed tensor's id and address can be reused).
        self._memo: dict[int, tuple[weakref.ref, int, int, str]] = {}

    def __call__(self, tensors: dict[str, torch.Tensor]) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(tensors):
            tensor = tensors[name]
            entry = self._memo.get(id(tensor))
            state = (tensor.data_ptr(), tensor._version)
            if entry is not None and entry[0]() is tensor and entry[1:3] == state:
                value = entry[3]
            else:
                value = tensor_hash(tensor)
                self._memo[id(tensor)] = (weakref.ref(tensor), *state, value)
            digest.update(f"{name}={value};".encode())
        self._memo = {k: v for k, v in self._memo.items() if v[0]() is not None}
        return digest.hexdigest()


# ---------------------------------------------------------------------------------- item identity


def _unwrap(dataset: Dataset) -> tuple[Dataset, list[int] | None]:
    """The innermost dataset under (nested) ``Subset``s and the indices into it (None: all)."""
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        inner = [int(i) for i in dataset.indices]
        indices = inner if indices is None else [inner[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _transform_of(dataset: Dataset) -> Any:
    inner, _ = _unwrap(dataset)
    return getattr(inner, "transform", None)


def _iter_transforms(transform: Any, depth: int = 0) -> Iterator[Any]:
    if transform is None or depth > 8:
        return
    yield transform
    for attribute in ("transforms", "transform"):
        children = getattr(transform, attribute, None)
        if children is None or children is transform:
            continue
        if isinstance(children, (list, tuple)):
            for child in children:
                yield from _iter_transforms(child, depth + 1)
        elif callable(children):
            yield from _iter_transforms(children, depth + 1)


def random_transform_steps(dataset: Dataset) -> list[str]:
    """Names of the known random steps in the dataset's ``transform`` (empty when none is found)."""
    names = []
    for step in _iter_transforms(_transform_of(dataset)):
        name = type(step).__name__
        if name.startswith("Random") or name in RANDOM_TRANSFORMS:
            names.append(name)
    return names


def transform_description(dataset: Dataset) -> str:
    """``repr`` of the dataset's transform (torchvision lists every step's options) plus library versions."""
    transform = _transform_of(dataset)
    described = "none" if transform is None else repr(transform)
    return f"{described}|{_versions()}"


def item_keys(dataset: Dataset) -> list[str] | None:
    """Stable identities of the dataset's inputs (transform included), or None when unknown."""
    custom = getattr(dataset, "prefix_cache_keys", None)
    if callable(custom):
        return [str(k) for k in custom()]
    from promptvit.data.dataset import ImageDataset

    inner, indices = _unwrap(dataset)
    if isinstance(inner, ImageDataset):
        samples = inner.samples
        transform = transform_description(inner)
        array_hashes: dict[int, str] = {}
        keys = []
        for sample in samples.items:
            if sample.path is not None:
                try:
                    stat = os.stat(sample.path)
                    identity = f"file:{os.path.abspath(sample.path)}|{stat.st_size}|{stat.st_mtime_ns}"
                except OSError:
                    identity = f"file:{os.path.abspath(sample.path)}|missing"
            else:
                index = int(sample.array_index)  # type: ignore[arg-type]
                if index not in array_hashes:
                    array_hashes[index] = _array_hash(samples.arrays[index])  # type: ignore[index]
                identity = f"array:{array_hashes[index]}"
            keys.append(f"{identity}|{transform}")
    elif isinstance(inner, TensorDataset):
        keys = _tensor_item_keys(inner.tensors[0])
    else:
        return None
    return keys if indices is None else [keys[i] for i in indices]


#: id(tensor) -> (weak reference, (version, storage, shape), keys)
_TENSOR_KEYS: dict[int, tuple[weakref.ref, tuple, list[str]]] = {}


def _tensor_item_keys(images: torch.Tensor) -> list[str]:
    """Content hash per row, memoised while the tensor is alive and unchanged (version counter, storage)."""
    state = (images._version, images.data_ptr(), tuple(images.shape))
    entry = _TENSOR_KEYS.get(id(images))
    if entry is not None and entry[0]() is images and entry[1] == state:
        return entry[2]
    keys = [f"tensor:{tensor_hash(images[i])}" for i in range(len(images))]
    for key in [k for k, v in _TENSOR_KEYS.items() if v[0]() is None]:
        del _TENSOR_KEYS[key]
    _TENSOR_KEYS[id(images)] = (weakref.ref(images), state, keys)
    return keys


def fast_targets(dataset: Dataset) -> torch.Tensor | None:
    """All targets without loading images, when the dataset type allows it."""
    from promptvit.data.dataset import ImageDataset

    inner, indices = _unwrap(dataset)
    if isinstance(inner, ImageDataset):
        targets = inner.targets_tensor()
    elif isinstance(inner, TensorDataset) and len(inner.tensors) > 1:
        targets = inner.tensors[1]
    else:
        return None
    return targets if indices is None else targets[torch.as_tensor(indices, dtype=torch.long)]


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Run the block without changing the torch (CPU), Python or NumPy generator states."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch (CPU), Python and NumPy for the block; every generator's state is restored afterwards."""
    with _preserved_rng():
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        yield


def _split_item(item: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(item, (list, tuple)):
        return item[0], (item[1] if len(item) > 1 else None)
    if isinstance(item, dict):
        return item["image"], item.get("target")
    return item, None


def check_deterministic(dataset: Dataset, *, probe: bool = True) -> None:
    """Raise :class:`CacheError` if the dataset's items are (or look) randomly augmented.

    Known random transform steps are refused by name; with ``probe`` the first item is also loaded twice
    under different seeds (generator states are restored) and must come back identical.
    """
    steps = random_transform_steps(dataset)
    if steps:
        raise CacheError(
            f"the dataset's transform has random steps ({', '.join(sorted(set(steps)))}), so its images change "
            "from one load to the next and their frozen prefix cannot be cached. Use a deterministic "
            "transform (e.g. the eval transform for training), or cache a fixed number of augmented views "
            "(TrainConfig.cache_views=n: epoch e trains on view (e - 1) mod n)."
        )
    if probe and len(dataset) > 0:
        with _seeded(12345):
            first, _ = _split_item(dataset[0])
        with _seeded(54321):
            second, _ = _split_item(dataset[0])
        if not torch.equal(torch.as_tensor(first), torch.as_tensor(second)):
            raise CacheError(
                "loading the first item twice gave two different images: the dataset is randomly augmented, "
                "so its frozen prefix cannot be cached. Use a deterministic transform, or cache_views=n."
            )


def _item_permutation(item: torch.Tensor) -> tuple[int, ...]:
    """Dims of ``item`` from outermost to innermost in memory (identity when contiguous).

    timm ViTs without a class token carry their token stream in a transposed layout (stride 1 along the
    tokens, from ``flatten(2).transpose(1, 2)`` in the patch embedding); kernels downstream sum in another
    order for another layout, so cached outputs keep the layout the model produced.
    """
    if item.is_contiguous():
        return tuple(range(item.dim()))
    return tuple(sorted(range(item.dim()), key=lambda d: (-item.stride(d), d)))


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
    inverse = [0] * len(perm)
    for position, dim in enumerate(perm):
        inverse[dim] = position
    return tuple(inverse)


def stack_like_model(items: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` that keeps the memory layout of the items (batch dimension outermost)."""
    perm = _item_permutation(items[0])
    if perm == tuple(range(items[0].dim())):
        return torch.stack([t.contiguous() for t in items])
    stacked = torch.stack([t.permute(perm).contiguous() for t in items])
    return stacked.permute(0, *[i + 1 for i in _inverse(perm)])


def _view_seed(key: str, view: int) -> int:
    return (
        int.from_bytes(hashlib.blake2b(f"{key}|view={view}".encode(), digest_size=8).digest(), "little") >> 1
    )


# ------------------------------------------------------------------------------------------- cache


class PrefixCache:
    """Frozen-prefix outputs per image, in memory and (with ``directory``) on disk.

    One instance can serve many runs, methods and datasets in a process: entries are keyed by what
    computed them (module docstring), so sharing is safe. ``memory=False`` keeps nothing in RAM between
    calls (disk only).
    """

    def __init__(self, directory: str | Path | None = None, *, memory: bool = True) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.memory = memory
        self._entries: dict[str, dict[str, torch.Tensor]] = {}
        self._fingerprint = _FingerprintMemo()
        #: counters since creation: items served from memory, from disk, and computed
        self.stats = {"memory_hits": 0, "disk_hits": 0, "computed": 0}

    def __repr__(self) -> str:
        items = sum(len(v) for v in self._entries.values())
        return f"PrefixCache(directory={self.directory}, memory={self.memory}, entries={items}, stats={self.stats})"

    def clear_memory(self) -> None:
        self._entries.clear()

    # ------------------------------------------------------------------ keys

    def prefix_key(
        self,
        model: nn.Module,
        cut: int,
        autocast_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> str:
        """Hash of everything that computes ``model.forward_prefix(x, cut)`` (module docstring)."""
        return _key_of(self.describe_prefix(model, cut, autocast_dtype, device))

    def describe_prefix(
        self,
        model: nn.Module,
        cut: int,
        autocast_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        """What the prefix key hashes (also written to ``prefix.json`` in a disk cache)."""
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        tensors = prefix_tensors(model, cut)
        dtypes = sorted({str(t.dtype) for t in tensors.values()})
        return {
            "format": CACHE_FORMAT,
            "cut": cut,
            "depth": model.geometry.depth,
            "geometry": {
                k: list(v) if isinstance(v, tuple) else v for k, v in model.geometry.to_dict().items()
            },
            "modules": _short(_prefix_modules_repr(model, cut)),
            "weights": self._fingerprint(tensors),
            "dtypes": dtypes,
            "autocast": None if autocast_dtype is None else str(autocast_dtype),
            # kernels differ between device types, so CPU and CUDA results are kept apart
            "device": torch.device(device).type,
            "torch": torch.__version__,
        }

    # ------------------------------------------------------------------ storage

    def _file(self, prefix_key: str, item_hash: str) -> Path:
        assert self.directory is not None
        return self.directory / prefix_key / item_hash[:2] / f"{item_hash}.safetensors"

    def _lookup(self, prefix_key: str, item_hash: str) -> torch.Tensor | None:
        entries = self._entries.get(prefix_key)
        if entries is not None and item_hash in entries:
            self.stats["memory_hits"] += 1
            return entries[item_hash]
        if self.directory is None:
            return None
        path = self._file(prefix_key, item_hash)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                perm = tuple(int(d) for d in (handle.metadata() or {}).get("perm", "").split(",") if d)
                tensor = handle.get_tensor("x")
            if perm:
                tensor = tensor.permute(_inverse(perm))
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as error:
            logger.warning("ignoring unreadable cache entry %s (%s); recomputing it", path, error)
            return None
        self.stats["disk_hits"] += 1
        if self.memory:
            self._entries.setdefault(prefix_key, {})[item_hash] = tensor
        return tensor

    def _store(self, prefix_key: str, item_hash: str, tensor: torch.Tensor, description: dict) -> None:
        self.stats["computed"] += 1
        if self.memory:
            self._entries.setdefault(prefix_key, {})[item_hash] = tensor
        if self.directory is not None:
            folder = self.directory / prefix_key
            if not (folder / PREFIX_FILE).is_file():
                folder.mkdir(parents=True, exist_ok=True)
                text = json.dumps(description, indent=2) + "\n"
                _write_atomically(folder / PREFIX_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            path = self._file(prefix_key, item_hash)
            path.parent.mkdir(parents=True, exist_ok=True)
            perm = _item_permutation(tensor)
            data = {"x": tensor.permute(perm).contiguous()}
            metadata = {"format": "pt", "perm": ",".join(map(str, perm))}
            _write_atomically(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))

    # ------------------------------------------------------------------ main entry point

    def prefix_outputs(
        self,
        model: nn.Module,
        dataset: Dataset,
        cut: int,
        *,
        view: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        device: torch.device | str | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        autocast_dtype: torch.dtype | None = None,
        check: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(outputs, targets)``: ``model.forward_prefix(x_i, cut)`` for every item, stacked in dataset order
        on the CPU, and the stacked targets (None when the items have none).

        Missing entries are computed in eval mode under ``torch.no_grad()`` (not inference mode, so the
        tensors can enter autograd later) on ``device`` (default: the model's). ``view`` selects a fixed
        augmented view (see the module docstring); without it the dataset must be deterministic (checked
        unless ``check=False``). Global random generators are left as they were.
        """
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if view is None and check:
            check_deterministic(dataset)
        keys = item_keys(dataset)
        if view is not None and keys is None:
            raise CacheError(
                f"cache_views needs item identities, which {type(dataset).__name__} does not provide; use "
                "promptvit.data.ImageDataset (or a Subset of one), or define prefix_cache_keys() on the dataset"
            )
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        device = torch.device(device)
        description = self.describe_prefix(model, cut, autocast_dtype, device)
        prefix_key = _key_of(description)
        context = autocast or contextlib.nullcontext
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), _preserved_rng():
                if keys is None:
                    outputs, targets = self._by_content(
                        model, dataset, cut, prefix_key, description, batch_size, num_workers, device, context
                    )
                else:
                    outputs, targets = self._by_key(
                        model,
                        dataset,
                        cut,
                        keys,
                        view,
                        prefix_key,
                        description,
                        batch_size,
                        num_workers,
                        device,
                        context,
                    )
        finally:
            model.train(was_training)
        return outputs, targets

    def _forward(self, model: nn.Module, images: torch.Tensor, cut: int, device, context) -> torch.Tensor:
        with context():
            out = model.forward_prefix(images.to(device, non_blocking=True), cut)
        return out.detach().to("cpu")

    def _by_key(
        self,
        model: nn.Module,
        dataset: Dataset,
        cut: int,
        keys: list[str],
        view: int | None,
        prefix_key: str,
        description: dict,
        batch_size: int,
        num_workers: int,
        device: torch.device,
        context: Callable,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        suffix = "" if view is None else f"|view={view}"
        hashes = [_short(k + suffix) for k in keys]
        found: list[torch.Tensor | None] = [self._lookup(prefix_key, h) for h in hashes]
        missing = [i for i, t in enumerate(found) if t is None]
        targets = fast_targets(dataset)
        collected: dict[int, Any] = {}
        if missing:
            if view is None:
                loader = DataLoader(
                    Subset(dataset, missing), batch_size=batch_size, shuffle=False, num_workers=num_workers
                )
                batches = (
                    (missing[s : s + batch_size], b)
                    for s, b in zip(range(0, len(missing), batch_size), loader, strict=True)
                )
            else:
                batches = self._view_batches(dataset, missing, keys, view, batch_size)
            for indices, batch in batches:
                images, target = _split_item(batch)
                out = self._forward(model, torch.as_tensor(images), cut, device, context)
                for row, index in enumerate(indices):
                    found[index] = out[row]
                    self._store(prefix_key, hashes[index], out[row], description)
                    if target is not None:
                        collected[index] = target[row]
        if targets is None:
            # Unknown dataset layout with keys (prefix_cache_keys): targets come from loading the items.
            targets = self._load_targets(dataset, collected)
        return stack_like_model(found), targets  # type: ignore[arg-type]

    @staticmethod
    def _view_batches(
        dataset: Dataset, indices: Sequence[int], keys: list[str], view: int, batch_size: int
    ) -> Iterator[tuple[list[int], tuple[torch.Tensor, torch.Tensor | None]]]:
        for start in range(0, len(indices), batch_size):
            chunk = list(indices[start : start + batch_size])
            images, targets = [], []
            for index in chunk:
                with _seeded(_view_seed(keys[index], view)):
                    image, target = _split_item(dataset[index])
                images.append(torch.as_tensor(image))
                targets.append(None if target is None else torch.as_tensor(target))
            stacked = torch.stack(targets) if all(t is not None for t in targets) else None
            yield chunk, (torch.stack(images), stacked)

    @staticmethod
    def _load_targets(dataset: Dataset, collected: dict[int, Any]) -> torch.Tensor | None:
        targets = []
        for index in range(len(dataset)):
            if index in collected:
                targets.append(torch.as_tensor(collected[index]))
                continue
            _, target = _split_item(dataset[index])
            if target is None:
                return None
            targets.append(torch.as_tensor(target))
        return torch.stack(targets)

    def _by_content(
        self,
        model: nn.Module,
        dataset: Dataset,
        cut: int,
        prefix_key: str,
        description: dict,
        batch_size: int,
        num_workers: int,
        device: torch.device,
        context: Callable,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Datasets without item identities: load every item, key it by the hash of its image tensor."""
        outputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        has_targets = True
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        for batch in loader:
            images, target = _split_item(batch)
            images = torch.as_tensor(images)
            hashes = [_short("content:" + tensor_hash(image)) for image in images]
            rows: list[torch.Tensor | None] = [self._lookup(prefix_key, h) for h in hashes]
            missing = [i for i, t in enumerate(rows) if t is None]
            if missing:
                out = self._forward(model, images[missing], cut, device, context)
                for row, index in enumerate(missing):
                    rows[index] = out[row]
                    self._store(prefix_key, hashes[index], out[row], description)
            outputs.extend(rows)  # type: ignore[arg-type]
            if target is None:
                has_targets = False
            else:
                targets.append(torch.as_tensor(target))
        return stack_like_model(outputs), (torch.cat(targets) if has_targets and targets else None)


class CachedBatches:
    """Batches ``(outputs[idx], targets[idx])`` of cached prefix outputs, ``idx`` from a DataLoader over indices.

    Built like the DataLoader over the source dataset (same length, batch size, shuffle and generator), it
    yields the same items in the same batches. Indexing a whole batch at once keeps the model's memory layout
    (``DataLoader``'s default collate would make each batch contiguous).
    """

    def __init__(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor | None,
        *,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        pin_memory: bool = False,
        batch_sampler: Iterable[list[int]] | None = None,
    ) -> None:
        self.outputs = outputs
        self.targets = targets
        self.pin_memory = pin_memory
        if batch_sampler is not None:  # fixed index batches (the class-balanced sampler)
            self.indices = DataLoader(range(outputs.shape[0]), batch_sampler=batch_sampler)
        else:
            self.indices = DataLoader(
                range(outputs.shape[0]), batch_size=batch_size, shuffle=shuffle, generator=generator
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Any]:
        # Start the index DataLoader now, as DataLoader.__iter__ does (it draws its base seed from the
        # generator at once; tqdm.auto calls iter() an extra time), so the shuffle matches draw for draw.
        return self._batches(iter(self.indices))

    def _batches(self, indices: Iterator[torch.Tensor]) -> Iterator[Any]:
        for index in indices:
            outputs = self.outputs[index]
            if self.pin_memory:
                outputs = outputs.pin_memory()
            yield outputs if self.targets is None else (outputs, self.targets[index])
