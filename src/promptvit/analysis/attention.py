"""Attention of token backbones (wrapped or not): extraction, average attention distance, CLS/prompt maps.

Extraction (``AttentionRecorder``, ``capture_attention``) goes through the backbone adapter only: a forward
pre-hook on every block's attention (``adapter.attention_slot``) sees that module's input and keyword
arguments (Eva's rotary table ``rope``, Beit's ``shared_rel_pos_bias``, ``attn_mask``/``is_causal``) and,
per module:

1. if it exposes ``attention_weights(x, **call) -> (B, H, N, N)`` (an injected method layer that changes the
   attention), that is used (source ``"attention_weights"``);
2. otherwise the probabilities are recomputed from the family's parts for that call,
   ``adapter.attention_parts_from_call(i)(attention, call).probabilities(x, mask)``: q and k from the
   module's ``qkv`` (called as a module, so a LoRA ``qkv`` or forward hooks on it, such as DA-VPT's
   key/value bias, take part), its q/v biases, q/k norms and rotary positions, plus the family's logit bias
   (Beit's relative position bias, padded for inserted prompt tokens), i.e. ``softmax(scale q k^T + bias
   [+ mask])`` as the family computes it (source ``"recomputed"``). When the attention slot holds a wrapper
   without ``attention_weights``, the family's module under it (its ``base_layer``) is used (source
   ``"recomputed_inner"``): whatever the wrapper changes in the attention is then *not* reflected;
3. if it exposes ``token_scale(x, **call) -> (B, H, N)`` (EPT's patch-wise scale/gate), that is returned too.

The forward itself runs unchanged (fused or not); recomputation happens in the hook under ``no_grad``.

Average attention distance (AP §4.1 after Raghu et al. 2021 / Walmer et al. 2023): for one head and one
query patch i, the attention-weighted mean distance ``sum_j a_ij d(i, j)`` to the key patches j, averaged
over query patches (and then over images). Definitions:

* only patch tokens take part: prefix tokens (CLS, registers) and inserted prompt tokens are removed as
  queries and as keys, and each query's attention is renormalised over the patch keys
  (``a_ij / sum_{j' in patches} a_ij'``), so the value is "where in the image this head looks";
* ``d(i, j)`` is the Euclidean distance between patch centres; in patch units by default
  (``patch_size=(1, 1)``) or in input pixels with ``patch_size=(ph, pw)`` (what ``analyze`` reports).

CLS maps: the CLS query's attention to the patch keys (raw probabilities, not renormalised; their sum is
reported as the patch share; with EPT's ``attention_weights`` rows sum to the EPT gate, not to 1), on the
patch grid. Prompt maps: the same for prompt-token queries (rows
right after the prefix tokens; their number is the block input's token count minus prefix and patches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from promptvit.analysis.extract import (
    TokenLayout,
    all_token_outputs,
    backbone_of,
    eval_mode,
    iterate_batches,
    model_device,
)
from promptvit.backbones import BackboneError, PartsFromCall, adapter_for, unwrap_base_layers


@dataclasses.dataclass
class LayerAttention:
    """One block's attention for one batch."""

    probs: torch.Tensor  # (B, H, T, T) float32
    token_scale: torch.Tensor | None  # (B, H, T) when the attention module exposes token_scale
    source: str  # "attention_weights" | "recomputed" | "recomputed_inner"


def _call_arguments(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The input ``x`` and every other argument of one attention call by name (positional ones named by the
    module's ``forward`` signature); the call's own ``kwargs`` are not changed."""
    call = dict(kwargs)
    if len(args) > 1:
        names = list(inspect.signature(module.forward).parameters)[1 : len(args)]
        call.update(zip(names, args[1:], strict=True))
    return (args[0] if args else call.pop("x")), call


def _split_mask(x: torch.Tensor, call: dict[str, Any]) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The call's attention mask (``is_causal`` as a lower-triangular boolean mask) and the other arguments."""
    rest = {name: value for name, value in call.items() if name not in ("attn_mask", "is_causal")}
    mask = call.get("attn_mask")
    if call.get("is_causal", False):
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril_()
    return mask, rest


class AttentionRecorder:
    """Context manager: records every block's attention during the forwards run inside it.

    ``on_layer(block_index, LayerAttention)`` may reduce the record on the fly (its return value is stored
    in ``records[block_index]``), which keeps memory at one layer's probabilities for big models.
    BackboneError where the backbone has no token blocks or a block's attention can be neither asked nor
    recomputed.
    """

    def __init__(
        self,
        model: nn.Module,
        on_layer: Callable[[int, LayerAttention], Any] | None = None,
        blocks: Sequence[int] | None = None,
    ) -> None:
        adapter = adapter_for(backbone_of(model))
        if adapter.kind != "vit":
            raise BackboneError(
                f"{type(adapter.model).__name__} ({adapter.family}) has no token blocks to read attention from"
            )
        self.model = model
        self.blocks = list(range(len(adapter.blocks))) if blocks is None else list(blocks)
        self.modules: dict[int, nn.Module] = {}
        self.on_layer = on_layer
        self.records: dict[int, Any] = {}
        self._handles: list[Any] = []
        self._parts: dict[int, PartsFromCall] = {}
        self._keeping = contextlib.ExitStack()
        for index in self.blocks:
            parent, name = adapter.attention_slot(index)
            module = self.modules[index] = getattr(parent, name)
            if callable(getattr(module, "attention_weights", None)):
                continue
            try:
                parts = adapter.attention_parts_from_call(index)
                parts(unwrap_base_layers(module), {})
            except BackboneError as error:
                raise BackboneError(
                    f"block {index}: {type(module).__name__} exposes no attention_weights(x) and its attention "
                    f"cannot be recomputed: {error}"
                ) from error
            self._parts[index] = parts

    def _hook(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x, call = _call_arguments(module, args, kwargs)
        with torch.no_grad():
            if index in self._parts:
                inner = unwrap_base_layers(module)
                mask, rest = _split_mask(x, call)
                probs = self._parts[index](inner, rest).probabilities(x, mask)
                source = "recomputed" if inner is module else "recomputed_inner"
            else:
                probs = module.attention_weights(x, **call).float()
                source = "attention_weights"
            scale_fn = getattr(module, "token_scale", None)
            token_scale = scale_fn(x, **call).float() if callable(scale_fn) else None
        record = LayerAttention(probs=probs.detach(), token_scale=token_scale, source=source)
        self.records[index] = self.on_layer(index, record) if self.on_layer else record

    def __enter__(self) -> AttentionRecorder:
        self._keeping.enter_context(all_token_outputs(self.model))  # every block runs its attention
        for index, module in self.modules.items():
            self._handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, k, i=index: self._hook(i, m, a, k), with_kwargs=True
                )
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._keeping.close()


@torch.no_grad()
def capture_attention(model: nn.Module, images: torch.Tensor) -> list[LayerAttention]:
    """Every block's attention for one batch of images (the model runs in eval mode, then is restored)."""
    with eval_mode(model), AttentionRecorder(model) as recorder:
        model.forward_features(images.to(model_device(model)))
    return [recorder.records[i] for i in recorder.blocks]


# --- pure measures -----------------------------------------------------------------------------------


def patch_coordinates(grid: tuple[int, int], patch_size: tuple[float, float] = (1, 1)) -> torch.Tensor:
    """(N, 2) patch-centre coordinates (row, col) in row-major token order, scaled by the patch size."""
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack(
        [r.reshape(-1) * float(patch_size[0]), c.reshape(-1) * float(patch_size[1])], 1
    ).double()


@functools.lru_cache(maxsize=16)
def _cached_distances(grid: tuple[int, int], patch_size: tuple[float, float]) -> torch.Tensor:
    coords = patch_coordinates(grid, patch_size)
    return torch.cdist(coords, coords)


def patch_distances(grid: tuple[int, int], patch_size: tuple[float, float] = (1, 1)) -> torch.Tensor:
    """(N, N) Euclidean distances between patch centres."""
    key = (int(grid[0]), int(grid[1])), (float(patch_size[0]), float(patch_size[1]))
    return _cached_distances(*key).clone()


def attention_distance(
    attn: torch.Tensor, grid: tuple[int, int], patch_size: tuple[float, float] = (1, 1)
) -> torch.Tensor:
    """Mean attention distance (...,) of patch-to-patch attention (..., N, N), rows renormalised over keys."""
    n = grid[0] * grid[1]
    if attn.shape[-1] != n or attn.shape[-2] != n:
        raise ValueError(
            f"attention over patches must be (..., {n}, {n}) for a {grid} grid, got {tuple(attn.shape)}"
        )
    a = attn.double()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    per_query = (a * patch_distances(grid, patch_size).to(a.device)).sum(-1)
    return per_query.mean(-1)


def patch_attention(probs: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The patch-query x patch-key part (..., N, N) of full attention probabilities (..., T, T)."""
    return probs[..., layout.patches, layout.patches]


def layer_attention_distance(
    probs: torch.Tensor, layout: TokenLayout, patch_size: tuple[float, float] = (1, 1)
) -> torch.Tensor:
    """(B, H) mean attention distance per image and head, prefix and prompt tokens excluded."""
    return attention_distance(patch_attention(probs, layout), layout.grid, patch_size)


def cls_attention_share(probs: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    """(B, H) attention mass of the CLS (first prefix) query on prefix, prompt and patch keys."""
    if not layout.num_prefix:
        raise ValueError("the model has no prefix (CLS) token")
    row = probs[..., 0, :]
    return {
        "prefix": row[..., layout.prefix].sum(-1),
        "prompts": row[..., layout.prompts].sum(-1),
        "patches": row[..., layout.patches].sum(-1),
    }


def cls_attention_map(probs: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, H, rows, cols): the CLS query's attention probabilities on the patch keys, on the patch grid."""
    if not layout.num_prefix:
        raise ValueError("the model has no prefix (CLS) token")
    return probs[..., 0, layout.patches].reshape(*probs.shape[:-2], *layout.grid)


def prompt_attention_maps(
    probs: torch.Tensor, layout: TokenLayout, prompt_indices: Sequence[int]
) -> torch.Tensor:
    """(B, len(indices), H, rows, cols): chosen prompt queries' attention on the patch keys."""
    bad = [i for i in prompt_indices if not 0 <= i < layout.num_prompts]
    if bad:
        raise ValueError(f"prompt indices {bad} out of range for {layout.num_prompts} prompt tokens")
    rows = [layout.num_prefix + i for i in prompt_indices]
    maps = probs[..., rows, :][..., layout.patches]  # (B, H, P, N)
    return maps.reshape(*maps.shape[:-1], *layout.grid).transpose(-4, -3)


# --- plots -------------------------------------------------------------------------------------------


def plot_attention_distance(
    distances: dict[str, Any], path: str | Path, *, unit: str = "pixels", title: str | None = None
) -> None:
    """Per model: each head's mean attention distance per layer (dots, sorted within the layer) + mean line."""
    from promptvit.analysis._plotting import colour, new_figure, save_figure, wrap

    fig, axes = new_figure(1, max(len(distances), 1), width=5.0, height=3.8)
    for col, (name, values) in enumerate(distances.items()):
        ax = axes[0, col]
        d = np.asarray(values, dtype=np.float64)  # (L, H)
        layers = np.arange(1, d.shape[0] + 1)
        for head in range(d.shape[1]):
            ax.scatter(
                layers,
                np.sort(d, axis=1)[:, head],
                s=12,
                color=colour(col),
                alpha=0.45,
                label="heads (sorted)" if head == 0 else None,
            )
        ax.plot(layers, d.mean(1), color="black", marker="o", linewidth=1.2, label="mean over heads")
        ax.set_xlabel("block (1 = first)")
        ax.set_ylabel(f"mean attention distance ({unit})")
        ax.set_xticks(layers)
        ax.set_title(f"{name}")
        ax.legend(fontsize=7)
    fig.suptitle(
        wrap(
            title or "Average attention distance per head (patch tokens only; AP §4.1)",
            int(12 * fig.get_figwidth()),
        )
    )
    save_figure(fig, path)


def _display_image(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1], min-max rescaled per image (the input normalisation is unknown)."""
    img = image.detach().float().cpu()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    img = img[:3]
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    return img.permute(1, 2, 0).numpy()


def upsample_map(amap: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(rows, cols) map -> (H, W) by bilinear interpolation."""
    up = F.interpolate(
        amap.detach().float().cpu()[None, None], size=size, mode="bilinear", align_corners=False
    )
    return up[0, 0].numpy()


def plot_attention_maps(
    images: torch.Tensor,
    panels: Sequence[tuple[str, torch.Tensor]],
    path: str | Path,
    *,
    title: str,
) -> None:
    """Rows = images; first column the image, then one overlay per panel ``(label, maps (n, rows, cols))``.

    Each overlay is upsampled (bilinear) to the image size; a column shares one colour scale, from 0 to
    that panel's maximum over the images, read on the colour bar under it (numbers in ``analysis.json``).
    """
    from promptvit.analysis._plotting import new_figure, save_figure, wrap

    n = images.shape[0]
    fig, axes = new_figure(max(n, 1), len(panels) + 1, width=2.1, height=2.1)
    size = tuple(images.shape[-2:])
    for row in range(n):
        shown = _display_image(images[row])
        ax = axes[row, 0]
        ax.imshow(shown)
        ax.set_title(f"image {row}", fontsize=8)
        ax.axis("off")
        for col, (label, maps) in enumerate(panels, start=1):
            ax = axes[row, col]
            amap = upsample_map(maps[row], size)
            ax.imshow(shown)
            vmax = float(maps.max()) if float(maps.max()) > 0 else 1.0  # one scale per column
            overlay = ax.imshow(amap, cmap="inferno", alpha=0.55, vmin=0.0, vmax=vmax)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
            if row == n - 1:
                fig.colorbar(overlay, ax=ax, orientation="horizontal", fraction=0.05, label="attention prob.")
    fig.suptitle(wrap(title, max(40, int(11 * fig.get_figwidth()))), fontsize=10)
    save_figure(fig, path)


def default_map_layers(depth: int) -> list[int]:
    """Block indices shown in attention maps: a shallow, a middle and the last block."""
    return sorted({max(0, math.ceil(depth / 4) - 1), depth // 2, depth - 1})


@torch.no_grad()
def average_attention_distance(
    model: nn.Module,
    images: torch.Tensor,
    *,
    patch_size: tuple[float, float] | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """(L, H) mean attention distance of a ViT over images (pixels by default: the model's patch size)."""
    from promptvit.analysis.extract import geometry_for, patch_grid

    geometry = geometry_for(model)
    size = patch_size if patch_size is not None else geometry.patch_size
    sums: dict[int, torch.Tensor] = {}
    count = 0

    def reduce(index: int, record: LayerAttention) -> torch.Tensor:
        grid = patch_grid(geometry, current_hw)
        layout = TokenLayout.from_count(record.probs.shape[-1], geometry.num_prefix_tokens, grid)
        return layer_attention_distance(record.probs, layout, size).sum(0).cpu()

    with eval_mode(model), AttentionRecorder(model, reduce) as recorder:
        for batch in iterate_batches(images, batch_size):
            current_hw = tuple(batch.shape[-2:])
            model.forward_features(batch.to(model_device(model)))
            for i in recorder.blocks:
                sums[i] = sums.get(i, 0) + recorder.records[i]
            count += batch.shape[0]
    return torch.stack([sums[i] for i in sorted(sums)]).numpy() / max(count, 1)
