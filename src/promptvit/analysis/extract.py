"""Thin extraction helpers: what the analysis views read from a model.

Everything here takes a ``PromptModel`` or a plain timm model, runs it in eval mode under ``no_grad`` and
restores the previous train/eval flags afterwards; hooks are always removed, so the model is left exactly
as it was. Nothing here knows about training.

Token layout of a (prompted) timm ViT block input, as built by ``promptvit.layers.token_prompts``::

    [prefix tokens (CLS, registers) | inserted prompt tokens | patch tokens]

``TokenLayout`` names those three ranges. The number of prompt tokens at a block is the token count seen
there minus ``num_prefix_tokens + num_patches`` (so methods that add no tokens give 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from promptvit.backbones import Geometry, adapter_for, cnn_stages, geometry_of, is_vit


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm model inside a ``PromptModel`` (or the model itself)."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model


def geometry_for(model: nn.Module) -> Geometry:
    geometry = getattr(model, "geometry", None)
    return geometry if isinstance(geometry, Geometry) else geometry_of(backbone_of(model))


def model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def configured_prompt_length(model: nn.Module) -> int | None:
    """``model.method.config.prompt_length`` if the method has one (used as a cross-check only)."""
    config = getattr(getattr(model, "method", None), "config", None)
    length = getattr(config, "prompt_length", None)
    return int(length) if isinstance(length, int) and not isinstance(length, bool) else None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each module's own flag on exit."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where the prefix, prompt and patch tokens sit in a ViT token sequence."""

    num_prefix: int
    num_prompts: int
    grid: tuple[int, int]  # patch grid (rows, cols)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_prompts + self.num_patches

    @property
    def prefix(self) -> slice:
        return slice(0, self.num_prefix)

    @property
    def prompts(self) -> slice:
        return slice(self.num_prefix, self.num_prefix + self.num_prompts)

    @property
    def patches(self) -> slice:
        return slice(self.num_prefix + self.num_prompts, self.num_tokens)

    @classmethod
    def from_count(cls, num_tokens: int, num_prefix: int, grid: tuple[int, int]) -> TokenLayout:
        prompts = num_tokens - num_prefix - grid[0] * grid[1]
        if prompts < 0:
            raise ValueError(
                f"a sequence of {num_tokens} tokens cannot hold {num_prefix} prefix tokens and a "
                f"{grid[0]}x{grid[1]} patch grid"
            )
        return cls(num_prefix=num_prefix, num_prompts=prompts, grid=grid)


def patch_grid(geometry: Geometry, image_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """Patch grid of a ViT for images of ``image_hw`` (default: the size the model was built for)."""
    height, width = image_hw or geometry.img_size
    ph, pw = geometry.patch_size
    return height // ph, width // pw


def iterate_batches(data: torch.Tensor | Iterable[Any], batch_size: int = 32) -> Iterator[torch.Tensor]:
    """Image batches from a (N, C, H, W) tensor or from an iterable of batches / (images, targets) pairs."""
    if isinstance(data, torch.Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def extract_features(
    model: nn.Module, data: torch.Tensor | Iterable[Any], *, batch_size: int = 32
) -> np.ndarray:
    """Final pre-logits features ``forward_head(forward_features(x), pre_logits=True)``, (N, D) float32."""
    device = model_device(model)
    out = []
    with eval_mode(model):
        for images in iterate_batches(data, batch_size):
            features = model.forward_features(images.to(device))
            out.append(model.forward_head(features, pre_logits=True).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def all_token_outputs(model: nn.Module) -> contextlib.AbstractContextManager:
    """Every block computes every token's output (recorders read them): ``PromptModel.all_token_outputs``."""
    every_token = getattr(model, "all_token_outputs", None)
    return every_token() if callable(every_token) else contextlib.nullcontext()


def stage_map(model: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """A CNN stage's output as a (B, C, H, W) map of image positions, whatever the family's layout (Swin's
    stages give (B, H, W, C)): the adapter's ``stage_output_map``."""
    return adapter_for(backbone_of(model)).stage_output_map(output)


def layer_modules(model: nn.Module) -> list[nn.Module]:
    """The per-layer modules whose outputs the layer-wise views read: ViT blocks or CNN stages."""
    backbone = backbone_of(model)
    return list(backbone.blocks) if is_vit(backbone) else cnn_stages(backbone)


class BlockRecorder:
    """Forward hooks on every layer module recording ``(input, output)`` of the last forward.

    For ViT blocks the recorded input is the sequence the block really receives, i.e. after the method's
    own forward pre-hooks have inserted or replaced prompt tokens (forward hooks see the final arguments).
    ``on_block(index, input, output)`` may reduce them on the fly; its return value is what gets stored.
    """

    def __init__(
        self,
        model: nn.Module,
        on_block: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> None:
        self.model = model
        self.modules = layer_modules(model)
        self.on_block = on_block
        self.records: dict[int, Any] = {}
        self._handles: list[Any] = []
        self._keeping = contextlib.ExitStack()

    def _hook(self, index: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach()
        out = output.detach()
        self.records[index] = self.on_block(index, x, out) if self.on_block else (x, out)

    def _stage_done(self, index: int, x: torch.Tensor, output: torch.Tensor) -> None:
        self._hook(index, self.modules[index], (x,), output)

    def __enter__(self) -> BlockRecorder:
        self._keeping.enter_context(all_token_outputs(self.model))
        plan = getattr(self.model, "plan", None)
        if plan is not None:  # stages a family runs block by block (Swin's with prompts) report here
            self._keeping.enter_context(plan.using(stage_outputs=self._stage_done))
        for index, module in enumerate(self.modules):
            self._handles.append(
                module.register_forward_hook(lambda m, a, o, i=index: self._hook(i, m, a, o))
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._keeping.close()


@dataclasses.dataclass
class PooledTokens:
    """Per-image summaries of one ViT block output (prompts excluded from ``patch_mean`` and ``cls``)."""

    patch_mean: torch.Tensor  # (B, D) mean over patch tokens
    prompt_mean: torch.Tensor | None  # (B, D) mean over prompt tokens, None without prompts
    cls: torch.Tensor | None  # (B, D) first prefix token, None without prefix tokens


def pool_tokens(tokens: torch.Tensor, layout: TokenLayout) -> PooledTokens:
    tokens = tokens.float()
    return PooledTokens(
        patch_mean=tokens[:, layout.patches].mean(1),
        prompt_mean=tokens[:, layout.prompts].mean(1) if layout.num_prompts else None,
        cls=tokens[:, 0] if layout.num_prefix else None,
    )


def pool_layer_output(
    output: torch.Tensor, *, vit_layout: TokenLayout | None = None, pooling: str = "mean"
) -> torch.Tensor:
    """One (B, F) representation per image of a layer output, for layer-wise CKA.

    ViT block output (B, T, D): ``mean`` averages the patch tokens (prefix and prompt tokens excluded),
    ``cls`` takes the first prefix token (falls back to ``mean`` without one), ``flatten`` concatenates the
    patch tokens. CNN stage output as its channels-first map (B, C, H, W), see :func:`stage_map`:
    ``mean``/``cls`` = global average pooling, ``flatten`` flattens the map.
    """
    if pooling not in ("mean", "cls", "flatten"):
        raise ValueError(f"pooling must be 'mean', 'cls' or 'flatten', got {pooling!r}")
    output = output.float()
    if output.dim() == 4:
        return output.flatten(1) if pooling == "flatten" else output.mean((2, 3))
    if output.dim() != 3 or vit_layout is None:
        raise ValueError(f"cannot pool a layer output of shape {tuple(output.shape)}")
    if pooling == "cls" and vit_layout.num_prefix:
        return output[:, 0]
    patches = output[:, vit_layout.patches]
    return patches.flatten(1) if pooling == "flatten" else patches.mean(1)


@torch.no_grad()
def layer_representations(
    model: nn.Module, images: torch.Tensor, *, pooling: str = "mean", batch_size: int = 32
) -> list[np.ndarray]:
    """Per-layer (N, F) representations (ViT block outputs or CNN stage outputs), see ``pool_layer_output``."""
    geometry = geometry_for(model)
    vit = geometry.kind == "vit"
    grid = patch_grid(geometry, tuple(images.shape[-2:])) if vit else (0, 0)
    device = model_device(model)

    def reduce(index: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not vit:
            return pool_layer_output(stage_map(model, out), pooling=pooling).cpu()
        layout = TokenLayout.from_count(out.shape[1], geometry.num_prefix_tokens, grid)
        return pool_layer_output(out, vit_layout=layout, pooling=pooling).cpu()

    per_layer: list[list[torch.Tensor]] = []
    with eval_mode(model), BlockRecorder(model, reduce) as recorder:
        for batch in iterate_batches(images, batch_size):
            recorder.records.clear()
            model.forward_features(batch.to(device))
            if not per_layer:
                per_layer = [[] for _ in recorder.modules]
            for index in range(len(recorder.modules)):
                per_layer[index].append(recorder.records[index])
    return [torch.cat(chunks).numpy() for chunks in per_layer]
