"""Data-dependent prompt initialisation: prompts from the tokens each prompted layer receives (SPT).

SPT (docs/methods.md, SPT) runs the frozen backbone **without prompts** over training images and initialises the
prompts of layer ``i`` from the tokens that layer receives:

* layer 0: the ``patch_embed`` output, i.e. patch tokens **before** the position embedding, no CLS (the
  official code; ``layer0="patch_embed"``). SPT's eq. 1 defines E_0 = PatchEmbed(x) + E_pos, which reads as
  the tokens **after** it; ``layer0="pos_embed"`` takes that reading (the input of ``blocks[0]`` without the
  prefix tokens, as for every deeper layer);
* layer ``i >= 1``: the input of ``blocks[i]`` (= output of block ``i - 1``) with the prefix tokens
  (CLS, registers) removed.

Samplers (all per layer, all streaming: the data set is never held in memory):

* ``random`` (the official default): ``k`` tokens uniformly **without replacement** from all (image, patch)
  pairs seen. Each token gets a uniform random key from a seeded generator and the ``k`` smallest keys are
  kept (a bounded reservoir), which is the streaming form of the code's "argsort of uniform noise".
* ``mean_pool`` / ``max_pool``: per image, the ``N`` tokens (raster order) are cut into ``k - 1``
  consecutive windows of ``w = N // (k - 1)`` tokens, each pooled; the ``k``-th vector pools the last
  ``N mod w`` tokens, or the whole sequence when that remainder is 0 (the code's ``[-0:]`` slice). Then
  ``k`` of all pooled vectors are picked at random (same reservoir).
* ``kmeans``: a random reservoir of at most ``max_kmeans_tokens`` tokens per layer, clustered with
  scikit-learn's k-means++ (``n_init=1``, ``random_state=seed``); the ``k`` centroids are the prompts. The
  official code reads centroids computed offline (not released); the paper reports k-means on all tokens
  as far too slow (days), hence the cap. Memory: ``max_kmeans_tokens * d * 4`` bytes per layer on the CPU
  (61 MB per layer for 20000 tokens at d = 768); time: a few seconds per layer at that size.

At most ``max_images`` images are forwarded: the first ones the iterator yields (the rest of the iterator
is not pulled). Pass a shuffled stream if the data set is sorted by class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from promptvit.backbones import adapter_for

Sampler = Literal["random", "mean_pool", "max_pool", "kmeans"]
SAMPLERS: tuple[str, ...] = ("random", "mean_pool", "max_pool", "kmeans")


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images`` or ``(images, targets, ...)`` -> (images, targets or None)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        targets = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], targets
    raise TypeError(f"expected an image tensor or an (images, targets) pair, got {type(batch).__name__}")


def window_bounds(num_tokens: int, k: int) -> list[tuple[int, int]]:
    """The ``k`` (start, end) token windows of SPT's mean/max pooling (docs/methods.md, SPT)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k == 1:
        return [(0, num_tokens)]
    if k - 1 > num_tokens:
        raise ValueError(f"cannot pool {num_tokens} tokens into {k - 1} windows (prompt length {k})")
    width = num_tokens // (k - 1)
    bounds = [(i * width, (i + 1) * width) for i in range(k - 1)]
    remainder = num_tokens % width
    bounds.append((num_tokens - remainder, num_tokens) if remainder else (0, num_tokens))
    return bounds


def pool_windows(tokens: torch.Tensor, k: int, mode: Literal["mean", "max"]) -> torch.Tensor:
    """(B, N, d) tokens -> (B, k, d) window means or maxima."""
    pooled = []
    for start, end in window_bounds(tokens.shape[1], k):
        window = tokens[:, start:end]
        pooled.append(window.mean(dim=1) if mode == "mean" else window.amax(dim=1))
    return torch.stack(pooled, dim=1)


class RandomReservoir:
    """At most ``capacity`` rows drawn uniformly without replacement from all rows ever added.

    Every row gets a key from ``U(0, 1)`` (seeded generator, on the CPU) and the rows with the smallest keys
    are kept, so memory stays at ``capacity`` rows whatever the stream length.
    """

    def __init__(self, capacity: int, generator: torch.Generator, device: torch.device | str | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.generator = generator
        self.device = device
        self.rows: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.seen = 0
        #: the largest number of rows ever held (for checking that memory stays bounded)
        self.max_rows = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1])
        if self.device is not None:
            rows = rows.to(self.device, torch.float32)
        keys = torch.rand(rows.shape[0], generator=self.generator).to(rows.device)
        self.seen += rows.shape[0]
        if self.rows is not None:
            rows = torch.cat([self.rows, rows])
            keys = torch.cat([self.keys, keys])
        if rows.shape[0] > self.capacity:
            kept = torch.topk(keys, self.capacity, largest=False).indices
            rows, keys = rows[kept], keys[kept]
        self.rows, self.keys = rows, keys
        self.max_rows = max(self.max_rows, rows.shape[0])

    def sample(self) -> torch.Tensor:
        """The kept rows in increasing key order (deterministic for a given seed and stream)."""
        if self.rows is None:
            raise ValueError("no rows were added")
        return self.rows[torch.argsort(self.keys)]


class _StopForward(Exception):
    """Ends a forward pass once every layer that is sampled has been seen."""


class LayerTokenCatcher:
    """Hooks that record, per prompted layer, the tokens it receives in a prompt-free forward.

    Layer 0 is ``patch_embed``'s output (before the position embedding, no CLS), layer ``i >= 1`` the input of
    ``blocks[i]`` without the prefix tokens. With ``stop_early`` the forward stops (by an exception the
    ``run`` method catches) after the deepest needed layer, which saves the rest of the network.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layers: Sequence[int],
        stop_early: bool = False,
        layer0: Literal["patch_embed", "pos_embed"] = "patch_embed",
    ) -> None:
        if layer0 not in ("patch_embed", "pos_embed"):
            raise ValueError(f"layer0 must be 'patch_embed' or 'pos_embed', got {layer0!r}")
        self.layer0 = layer0
        self.adapter = adapter_for(backbone)
        depth = len(self.adapter.blocks)
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"layers {bad} out of range for a ViT with {depth} blocks")
        self.backbone = backbone
        self.layers = sorted(set(layers))
        self.num_prefix_tokens = self.adapter.num_prefix_tokens
        self.stop_early = stop_early
        self.tokens: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def hooked(self) -> Iterator[LayerTokenCatcher]:
        handles = []
        try:
            for layer in self.layers:
                if layer == 0 and self.layer0 == "patch_embed":
                    handles.append(self.adapter.patch_embed.register_forward_hook(self._record_patch_embed))
                else:
                    handles.append(
                        self.adapter.blocks[layer].register_forward_pre_hook(
                            functools.partial(self._record_block_input, layer)
                        )
                    )
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _maybe_stop(self, layer: int) -> None:
        if self.stop_early and layer == self.layers[-1]:
            raise _StopForward

    def _record_patch_embed(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.tokens[0] = output.reshape(output.shape[0], -1, output.shape[-1])  # NHWC (dynamic size) too
        self._maybe_stop(0)

    def _record_block_input(self, layer: int, module: nn.Module, args: tuple) -> None:
        tokens = args[0]
        if tokens.dim() == 4:  # a (B, H, W, C) map (Swin): its tokens in raster order
            tokens = tokens.flatten(1, 2)
        self.tokens[layer] = tokens[:, self.num_prefix_tokens :]
        self._maybe_stop(layer)

    def run(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Forward ``images`` through the backbone's features; returns {layer: (B, N, d) tokens}."""
        self.tokens = {}
        with contextlib.suppress(_StopForward):
            self.backbone.forward_features(images)
        return dict(self.tokens)


class PromptTokenSampler:
    """Streams per-layer tokens and turns them into ``k_i`` initial prompts per layer."""

    def __init__(
        self,
        layers: Sequence[int],
        k: int | Sequence[int],
        sampler: str = "random",
        *,
        max_images: int = 1024,
        max_kmeans_tokens: int = 20000,
        seed: int = 0,
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.layers = list(layers)
        ks = [k] * len(self.layers) if isinstance(k, int) else list(k)
        if len(ks) != len(self.layers) or any(v < 1 for v in ks):
            raise ValueError(f"need one prompt count >= 1 per layer, got k={k} for layers {self.layers}")
        self.k = dict(zip(self.layers, ks, strict=True))
        self.sampler = sampler
        self.max_images = max_images
        self.max_kmeans_tokens = max_kmeans_tokens
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        cpu = "cpu" if sampler == "kmeans" else None
        self.reservoirs = {
            layer: RandomReservoir(
                max_kmeans_tokens if sampler == "kmeans" else self.k[layer], generator, cpu
            )
            for layer in self.layers
        }
        self.images = 0
        self.tokens_seen = 0

    @property
    def remaining(self) -> int:
        """Images still wanted before the cap is reached."""
        return self.max_images - self.images

    @property
    def max_pool_rows(self) -> int:
        """The most rows any layer's pool ever held (bounded by k, or max_kmeans_tokens)."""
        return max(r.max_rows for r in self.reservoirs.values())

    def add(self, tokens: dict[int, torch.Tensor]) -> None:
        """Add one batch of (B, N, d) tokens per layer (B <= ``remaining``; extra images are ignored)."""
        batch = next(iter(tokens.values())).shape[0]
        take = min(batch, self.remaining)
        if take <= 0:
            return
        for layer in self.layers:
            x = tokens[layer][:take].detach()
            self.tokens_seen += x.shape[0] * x.shape[1]
            if self.sampler in ("mean_pool", "max_pool"):
                x = pool_windows(x, self.k[layer], "mean" if self.sampler == "mean_pool" else "max")
            self.reservoirs[layer].add(x)
        self.images += take

    def result(self) -> list[torch.Tensor]:
        """One (k_i, d) float32 tensor per layer, in the order of ``layers``."""
        if self.images == 0:
            raise ValueError("no training images were seen; cannot initialise prompts from data")
        out = []
        for layer in self.layers:
            reservoir, k = self.reservoirs[layer], self.k[layer]
            rows = reservoir.sample().float()
            if self.sampler == "kmeans":
                out.append(_kmeans_centroids(rows, k, self.seed).to(reservoir.rows.device))
                continue
            if rows.shape[0] < k:
                raise ValueError(
                    f"layer {layer}: only {rows.shape[0]} candidate tokens from {self.images} images for "
                    f"{k} prompts; use more images or a shorter prompt"
                )
            out.append(rows)
        return out


def _kmeans_centroids(rows: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    from sklearn.cluster import KMeans

    if rows.shape[0] < k:
        raise ValueError(f"k-means needs at least {k} tokens, got {rows.shape[0]}")
    model = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed)
    model.fit(rows.cpu().numpy())
    return torch.from_numpy(model.cluster_centers_).float()


@dataclasses.dataclass
class PromptTokenSample:
    """What ``sample_prompt_tokens`` returns: per-layer prompts and the cost of getting them."""

    tokens: list[torch.Tensor]  # one (k_i, d) tensor per requested layer
    images: int  # images forwarded
    tokens_seen: int  # (image, token) pairs fed to the sampler, over all layers
    seconds: float
    max_pool_rows: int  # the largest per-layer pool held while streaming

    def info(self, prefix: str = "spt_") -> dict[str, Any]:
        return {
            f"{prefix}seconds": round(self.seconds, 4),
            f"{prefix}images": self.images,
            f"{prefix}tokens": self.tokens_seen,
        }


@torch.no_grad()
def sample_prompt_tokens(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Sequence[int],
    k: int | Sequence[int],
    sampler: str = "random",
    *,
    max_images: int = 1024,
    max_kmeans_tokens: int = 20000,
    seed: int = 0,
    layer0: Literal["patch_embed", "pos_embed"] = "patch_embed",
) -> PromptTokenSample:
    """SPT's data-driven prompts for ``layers`` of a timm ViT (or a ``PromptModel`` around one).

    ``batches`` yields image tensors or ``(images, targets)`` pairs; it is pulled only until ``max_images``
    images were seen. A ``PromptModel`` whose method inserts token prompts runs with its prompts switched
    off. The model runs in eval mode (restored afterwards).
    """
    started = time.perf_counter()
    backbone = getattr(model, "backbone", model)
    method = getattr(model, "method", None)
    no_prompts = (
        method.without_token_prompts()
        if hasattr(method, "without_token_prompts")
        else contextlib.nullcontext()
    )
    stream = PromptTokenSampler(
        layers, k, sampler, max_images=max_images, max_kmeans_tokens=max_kmeans_tokens, seed=seed
    )
    catcher = LayerTokenCatcher(backbone, layers, stop_early=True, layer0=layer0)
    was_training = model.training
    model.eval()
    try:
        with no_prompts, catcher.hooked():
            for batch in batches:
                images, _ = split_batch(batch)
                images = images[: stream.remaining]
                stream.add(catcher.run(images))
                if stream.remaining <= 0:
                    break
    finally:
        model.train(was_training)
    tokens = stream.result()
    return PromptTokenSample(
        tokens=tokens,
        images=stream.images,
        tokens_seen=stream.tokens_seen,
        seconds=time.perf_counter() - started,
        max_pool_rows=stream.max_pool_rows,
    )
