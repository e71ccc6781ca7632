"""``PromptModel``: a timm backbone with one tuning method attached, and ``wrap`` to make one."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from promptvit.backbones import Geometry, backbone_source, classifier_name, geometry_of, weights_fingerprint
from promptvit.layers.selected_tokens import (
    class_token_row,
    forward_selected_tokens,
    supports_selected_tokens,
)
from promptvit.methods.base import ConfigError, Method, MethodConfig, make_config


class PromptModel(nn.Module):
    """A backbone plus one method; ``forward(images)`` gives logits.

    Exactly the method's parameters and the classifier head have ``requires_grad``. The timm model
    contract (``forward_features``, ``forward_head``, ``get_classifier``) is passed through, so timm
    training code keeps working.

    Class-token readout: when the head reads only the class token (timm ViT, ``global_pool='token'``), the
    logits paths (``forward``, ``forward_from_block``) run the last block for that one row; every token still
    serves as key and value (:mod:`promptvit.layers.selected_tokens`). Same logits up to float rounding (about
    1e-7 in float32), a sixth of the last block's cost; the final norm then sees that row only. It stands aside
    while anything hooks into the last block and under gradient checkpointing; ``all_token_outputs()`` (the
    analysis recorders enter it) or ``readout_rows_only = False`` turn it off. ``forward_features`` always
    returns every token.
    """

    def __init__(
        self, backbone: nn.Module, method: Method, source: dict[str, Any], base_fingerprint: str
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.method = method
        #: how to rebuild the backbone (timm name, pretrained or local weights file, build options)
        self.source = source
        #: hash of the backbone weights before tuning; an artifact only fits a backbone with the same hash
        self.base_fingerprint = base_fingerprint
        self.head_name = method.head_name(backbone)
        #: compute only the row the head reads in the last block (see the class docstring)
        self.readout_rows_only = True
        self._computing_logits = False
        self._install_class_token_readout()

    @property
    def geometry(self) -> Geometry:
        return self.method.geometry

    @property
    def config(self) -> MethodConfig:
        return self.method.config

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        geometry = self.geometry
        if (
            geometry.kind == "vit"
            and not geometry.dynamic_img_size
            and tuple(images.shape[-2:]) != geometry.img_size
        ):
            height, width = geometry.img_size
            raise ValueError(
                f"the model was built for {height}x{width} inputs but got {images.shape[-2]}x{images.shape[-1]}; "
                "resize the images (the transforms of promptvit.data do) or wrap a backbone built for that size"
            )
        with self._logits_pass():
            return self.backbone(images)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.backbone.forward_head(features, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_submodule(self.head_name)

    # ------------------------------------------------------------------ frozen-prefix caching

    def cache_cut(self) -> int:
        """Deepest point whose output is frozen and deterministic: ``method.tuned_from_block()``, checked.

        ``0``: nothing can be cached. ``l`` in ``1..depth-1`` (ViT): the token sequence at the input of
        ``blocks[l]``. ``depth``: the pre-logit features (ViT and CNN; for CNNs the only cut supported).
        """
        cut = int(self.method.tuned_from_block())
        depth = self.geometry.depth
        if not 0 <= cut <= depth:
            raise ValueError(
                f"method '{self.method.name}' reports tuned_from_block={cut}, outside 0..{depth}"
            )
        if self.method.trains_backbone:
            return 0
        if self.geometry.kind != "vit" and cut != depth:
            return 0
        return cut

    def _check_cut(self, block: int) -> None:
        depth = self.geometry.depth
        if not 0 <= block <= depth:
            raise ValueError(f"block {block} is out of range 0..{depth} for this backbone")
        if self.geometry.kind != "vit" and block not in (0, depth):
            raise ValueError(
                f"{self.geometry.architecture} is a CNN: only the pre-logit features (block={depth}) can be cut"
            )

    def forward_prefix(self, images: torch.Tensor, block: int) -> torch.Tensor:
        """The frozen part of the forward up to the cut ``block`` (see :meth:`cache_cut`).

        ViT, ``block < depth``: ``patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks[:block]``
        (hooks of those blocks run). ``block == depth``: ``forward_head(forward_features(x), pre_logits=True)``,
        the input of the classifier. ``forward_from_block(forward_prefix(x, l), l) == forward(x)``.
        """
        self._check_cut(block)
        backbone = self.backbone
        if block == self.geometry.depth:
            with self._logits_pass():
                return backbone.forward_head(backbone.forward_features(images), pre_logits=True)
        if self.geometry.kind != "vit":
            return images
        x = backbone.patch_embed(images)
        x = backbone._pos_embed(x)
        x = backbone.patch_drop(x)
        x = backbone.norm_pre(x)
        for blk in backbone.blocks[:block]:
            x = blk(x)
        return x

    def forward_from_block(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Logits from the output of :meth:`forward_prefix` at the same ``block``.

        Runs ``blocks[block:]`` (through their modules, so the method's pre-hooks on those blocks, e.g. token
        prompts and activation prompts, and its hook on ``norm``, which strips prompt tokens, all run),
        then ``norm`` and ``forward_head``. With ``block == depth`` only the classifier runs. Honours timm's
        gradient checkpointing (``backbone.set_grad_checkpointing``).
        """
        self._check_cut(block)
        backbone = self.backbone
        if block == self.geometry.depth:
            return backbone.get_classifier()(x)
        if self.geometry.kind != "vit":
            return backbone(x)
        blocks = list(backbone.blocks[block:])
        with self._logits_pass():
            if blocks and getattr(backbone, "grad_checkpointing", False) and torch.is_grad_enabled():
                from timm.models._manipulate import checkpoint_seq

                x = checkpoint_seq(blocks, x)
            else:
                for blk in blocks:
                    x = blk(x)
            x = backbone.norm(x)
            return backbone.forward_head(x)

    # ------------------------------------------------------------------ class-token readout

    def _install_class_token_readout(self) -> None:
        """Route the last block through :meth:`_last_block_forward` when timm's own head reads its output."""
        backbone = self.backbone
        if not (
            self.geometry.kind == "vit"
            and isinstance(backbone, VisionTransformer)
            and type(backbone).forward_head is VisionTransformer.forward_head
            and type(backbone).pool is VisionTransformer.pool
            and supports_selected_tokens(backbone.blocks[-1])
        ):
            return
        last = backbone.blocks[-1]
        # An instance attribute wrapping whatever forward the block had (token prompts may have set one).
        last.forward = functools.partial(self._last_block_forward, last, last.forward)

    @contextlib.contextmanager
    def all_token_outputs(self) -> Iterator[None]:
        """Within the block every block computes every token's output: no class-token readout, and token-prompt
        methods keep their prompt outputs. Same logits, more work; for tools that read hidden tokens."""
        previous = self.readout_rows_only
        self.readout_rows_only = False
        keeping = getattr(self.method, "keeping_prompt_outputs", None)
        try:
            with keeping() if callable(keeping) else contextlib.nullcontext():
                yield
        finally:
            self.readout_rows_only = previous

    @contextlib.contextmanager
    def _logits_pass(self) -> Iterator[None]:
        previous = self._computing_logits
        self._computing_logits = True
        try:
            yield
        finally:
            self._computing_logits = previous

    def _reads_class_token_only(self, block: nn.Module) -> bool:
        backbone = self.backbone
        return (
            self._computing_logits
            and self.readout_rows_only
            and backbone.global_pool == "token"
            and backbone.attn_pool is None
            # a checkpointed block is recomputed in backward, outside this pass, so it must not depend on it
            and not (backbone.grad_checkpointing and torch.is_grad_enabled())
            # hooks inside the block, or on its output, may read rows other than the class token
            and not block._forward_hooks
            and not any(m._forward_hooks or m._forward_pre_hooks for m in block.modules() if m is not block)
        )

    def _last_block_forward(
        self, block: nn.Module, block_forward: Callable[..., torch.Tensor], x: torch.Tensor, *args, **kwargs
    ) -> torch.Tensor:
        if args or kwargs or not self._reads_class_token_only(block):
            return block_forward(x, *args, **kwargs)
        return forward_selected_tokens(block, x, class_token_row)

    def _modules_in_train_mode(self) -> list[nn.Module]:
        if self.method.trains_backbone:
            return [self.backbone]
        return [*self.method.modules_in_train_mode(self.backbone), self.get_classifier()]

    #: re-estimate BatchNorm running statistics in tuned modules; off by default (few-shot batches of a
    #: handful of images give useless estimates), set by ``TrainConfig.batchnorm_stats``
    update_batchnorm_stats: bool = False

    def train(self, mode: bool = True) -> PromptModel:
        """Frozen parts stay in eval mode (no dropout, BatchNorm statistics fixed) unless the method tunes them.

        BatchNorm layers stay in eval mode (their pretrained running statistics in use and unchanged) even
        in tuned modules, unless ``update_batchnorm_stats``; their affine weights still train.
        """
        self.training = mode
        self.backbone.eval()
        for module in self._modules_in_train_mode():
            module.train(mode)
            if mode and not self.update_batchnorm_stats:
                for norm in module.modules():
                    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                        norm.eval()
        self.method.train(mode)
        return self

    def tuned_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        """Tuned parameters plus the buffers that training can change: exactly what an artifact stores.

        Those buffers are the method's own and those of modules trained in train mode (BatchNorm statistics).
        """
        state = {name: p.detach() for name, p in self.tuned_named_parameters()}
        names = {id(m): n for n, m in self.named_modules()}
        for module in [self.method, *self._modules_in_train_mode()]:
            prefix = names[id(module)]
            state.update({f"{prefix}.{n}": b.detach() for n, b in module.named_buffers()})
        return state

    def parameter_summary(self) -> dict[str, int]:
        """Tuned parameter counts by group (head, method), plus tuned and total."""
        head = sum(p.numel() for p in self.get_classifier().parameters() if p.requires_grad)
        tuned = sum(p.numel() for _, p in self.tuned_named_parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"method": tuned - head, "head": head, "tuned": tuned, "total": total}

    def print_trainable_parameters(self) -> str:
        """Print and return a one-line summary in the style of peft."""
        s = self.parameter_summary()
        line = (
            f"method {self.method.name}: tuned params {s['tuned']:,} (method {s['method']:,} + head {s['head']:,})"
            f" || all params {s['total']:,} || tuned% {100 * s['tuned'] / s['total']:.4f}"
        )
        print(line)
        return line

    def merge(self) -> None:
        self.method.merge()

    def unmerge(self) -> None:
        self.method.unmerge()

    def save_pretrained(self, directory: str | Path, **extra: Any) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (tuned parameters only)."""
        from promptvit.artifact import save_artifact

        return save_artifact(self, directory, **extra)


def wrap(
    model: nn.Module,
    method: str | MethodConfig = "linear",
    *,
    num_classes: int | None = None,
    base_model_name: str | None = None,
    **options: Any,
) -> PromptModel:
    """Attach a tuning method to a timm model and freeze everything else.

    Args:
        model: a timm ViT (or, for methods that allow it, a timm CNN); it is modified in place.
        method: a registered method name (see ``available_methods()``) or a method config object.
        num_classes: size of a new classifier head; ``None`` keeps the model's own head.
        base_model_name: timm name (with pretrained tag) recorded in saved artifacts so that ``load``
            can rebuild the backbone; defaults to what ``create_backbone`` recorded, else timm's
            ``pretrained_cfg`` name.
        **options: the method's options, e.g. ``prompt_length=20, deep=True`` for ``vpt``.
    """
    if isinstance(model, PromptModel):
        raise ConfigError("this model is already wrapped; wrap the plain timm backbone instead")
    method_cls, config = make_config(method, **options)
    if num_classes is not None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        model.reset_classifier(num_classes)
    if model.num_classes < 1:
        raise ConfigError("the model has no classifier (num_classes=0); pass num_classes to wrap()")
    geometry = geometry_of(model)
    if geometry.kind not in method_cls.supported_kinds:
        raise ConfigError(
            f"method '{method_cls.name}' supports {', '.join(method_cls.supported_kinds)} backbones, "
            f"not {geometry.architecture} ({geometry.kind})"
        )
    source = backbone_source(model)
    if base_model_name is not None:
        source["name"] = base_model_name
    head = classifier_name(model)
    # The head is new or replaced per task, so only the body identifies the backbone.
    fingerprint = weights_fingerprint(
        {n: p for n, p in model.named_parameters() if not n.startswith(head + ".")}
    )
    model.requires_grad_(False)
    tuner = method_cls(config, geometry)
    tuner.attach(model)
    for parameter in tuner.backbone_parameters_to_tune(model):
        parameter.requires_grad_(True)
    wrapped = PromptModel(model, tuner, source, fingerprint)
    wrapped.get_classifier().requires_grad_(True)
    wrapped.train(model.training)
    return wrapped
