"""DA-VPT (and DA-VPT+): deep prompts guided by a class -> prompt metric loss (docs/methods.md, DA-VPT).

Architecture (as the released code): deep prompts at **every** block, each replacing the previous block's
prompt outputs (``[CLS, prompts_l, patches]``). Guided blocks (``guided_layers``, default the last one)
hold ``M = num_proxy_prompts`` prompts that act as class proxies; the other blocks hold ``prompt_length``
prompts (0 allowed). Prompts start from the code's ``xavier_uniform_ / 8`` (``prompt_init="xavier"``),
VPT's uniform init, or SPT's data init (``prompt_init="spt"``, see :mod:`promptvit.layers.prompt_init`).

Class -> prompt mapping ``m(y)`` (one mapping shared by all guided layers): ``initialize_from_data`` runs the
frozen prompt-free model over at most ``init_images_per_class`` training images per class, takes the class
means of the pre-logit feature (what the head receives: final-norm CLS, or pooled patches) and clusters
them with **cosine k-means** (:func:`cosine_kmeans`: parameter-free layer norm, L2-normalise, random
initial centroids from ``seed``, ``kmeans_iters`` iterations, tolerance ``kmeans_tol``). With
``#classes <= M`` the method uses ``M := #classes`` prompts and the identity mapping. After every epoch from
``update_mapping_from_epoch`` on, k-means is re-run on the running class means of the current model's
pre-logit features (accumulated during the training steps), **warm-started** from the previous centroids;
classes not seen in the epoch keep their prompt, and the update is skipped if all classes collapse into one
prompt.

Loss (Proxy-Anchor form of the released code, docs/methods.md, DA-VPT): with ``s_bm = r * cos(a_b, p_m)``::

    L = 1/M sum_m log(1 + sum_{b in P_m} exp(-alpha (s_bm - margin_pos)))
      + 1/M sum_m log(1 + sum_{b not in P_m} exp(alpha (s_bm - margin_neg)))

(proxies without positives or negatives in the batch contribute 0 but count in ``1/M``), proxies = the
guided layer's prompts (L2-normalised, scaled by ``r = proxy_scale``), and ``P_m`` the samples with
``m(y_b) = m``. Two anchors per guided layer ``l``:

* ``L_patch`` = L_ML(x, p): ``anchor="patch_mean"`` (code) the mean of the block-input image tokens;
  ``anchor="prompt_attn_out"`` (paper, "MHSA(x)") the pre-projection attention output (concatenated heads,
  the input of ``attn.proj``) at the position of the sample's mapped prompt;
* ``L_cls`` = L_ML(p, x_cls): the query of the CLS token, ``W_q LN1(x_cls) + b_q`` (the Q slice of timm's
  fused ``qkv`` output at the CLS position). Backbones without a class token skip this term.

``auxiliary_loss = 1/|G| sum_l (beta L_patch + lam L_cls)``.

Multi-label targets (float multi-hot, our rule; docs/methods.md, DA-VPT): multi-positive Proxy-Anchor -- the mapped prompt
of every positive label is a positive for the sample (for ``prompt_attn_out`` the anchor is the mean of the
attention outputs at those prompts); all-negative images are left out of the metric loss.

DA-VPT+ (``bias_set``): ``"kv"`` adds trainable zero-initialised deltas to the K and V slices of every block's
fused ``qkv`` output (a forward hook: the same as training the K and V biases, while the Q bias stays
frozen); ``"full_released"`` (the released configs) also frees the biases of ``attn.proj``, ``mlp.fc2``,
``norm2``, the weight and bias of ``norm1`` and the CLS token.

Prompt norm and mask (the code's ``vpt_norm`` and ``mask``; docs/methods.md, DA-VPT): ``prompt_norm="l2"``
inserts ``p / max(||p||, 1e-6)`` for every prompt ``p`` (the proxies of the loss are the same unit vectors
times ``r``); ``prompt_mask=True`` gives the prompt queries attention over the patch tokens only (the
prefix tokens and all prompts, the query's own included, are masked out). Only the prompt rows of a block's
output change, and every block replaces them or the final norm strips them, so the logits do not; what
reads them is ``anchor="prompt_attn_out"``. The mask recomputes those rows from the block's q, k, v at the
input of ``attn.proj`` (timm's plain softmax attention only). The class-balanced sampler and gradient
clipping by value are training options (``TrainConfig.sampler``, ``grad_clip_value``); stochastic depth is
the backbone option ``drop_path_rate``.

Not implemented from the code: ``vpt_norm="layer"`` (a learned LayerNorm on the prompts) and the query/key
proxy types.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from promptvit.backbones import BackboneError, Geometry, adapter_for, classifier_name, unwrap_base_layers
from promptvit.layers.prompt_init import (
    SAMPLERS,
    LayerTokenCatcher,
    PromptTokenSampler,
    split_batch,
)
from promptvit.layers.token_prompts import (
    TokenPrompts,
    expand_prompts,
    init_vpt_uniform_,
    reference_device_dtype,
)
from promptvit.methods.base import ConfigError, Method, MethodConfig, register_method
from promptvit.methods.lora import check_block_list, resolve_blocks


@dataclasses.dataclass
class DAVPTConfig(MethodConfig):
    prompt_length: int = 10  # prompts at the non-guided blocks (0: only the guided blocks have prompts)
    num_proxy_prompts: int = 10  # M prompts at each guided block (capped at the number of classes)
    guided_layers: list[int] | None = None  # blocks with the metric loss; None: the last block
    beta: float = 0.05  # weight of L_ML(x, p)
    lam: float = 0.05  # weight of L_ML(p, x_cls)
    alpha: float = 32.0
    margin_pos: float = 0.1
    margin_neg: float = -0.1
    proxy_scale: float = 5.0  # r: proxies are L2-normalised prompts times r
    anchor: Literal["patch_mean", "prompt_attn_out"] = "patch_mean"  # code / paper patch anchor
    bias_set: Literal["none", "kv", "full_released"] = "none"  # "kv" = DA-VPT+ (paper)
    init_images_per_class: int = 10  # images per class for the initial class means
    update_mapping_from_epoch: int = 1  # re-run k-means after every epoch >= this (epochs count from 1)
    kmeans_iters: int = 20
    kmeans_tol: float = 1e-4
    prompt_init: Literal["xavier", "uniform", "spt"] = "xavier"  # code: xavier_uniform_ / 8
    spt_sampler: Literal["random", "mean_pool", "max_pool", "kmeans"] = "random"  # with prompt_init="spt"
    spt_max_images: int = 1024
    spt_max_kmeans_tokens: int = 20000
    dropout: float = 0.0  # prompt dropout
    prompt_norm: Literal["none", "l2"] = "none"  # code's vpt_norm: "l2" inserts unit-norm prompts
    prompt_mask: bool = False  # code's mask: prompt queries attend to the patch tokens only
    seed: int = 0  # k-means initial centroids, random mapping of unseen classes, SPT sampling

    def validate(self) -> None:
        if self.prompt_length < 0:
            raise ConfigError(f"da_vpt: prompt_length must be >= 0, got {self.prompt_length}")
        if self.num_proxy_prompts < 1:
            raise ConfigError(f"da_vpt: num_proxy_prompts must be >= 1, got {self.num_proxy_prompts}")
        self.guided_layers = check_block_list(self.guided_layers, "da_vpt")
        for name in ("beta", "lam", "alpha", "proxy_scale", "kmeans_tol"):
            if getattr(self, name) < 0:
                raise ConfigError(f"da_vpt: {name} must be >= 0, got {getattr(self, name)}")
        if self.anchor not in ("patch_mean", "prompt_attn_out"):
            raise ConfigError(
                f"da_vpt: anchor must be 'patch_mean' or 'prompt_attn_out', got {self.anchor!r}"
            )
        if self.bias_set not in ("none", "kv", "full_released"):
            raise ConfigError(
                f"da_vpt: bias_set must be 'none', 'kv' or 'full_released', got {self.bias_set!r}"
            )
        if self.init_images_per_class < 1:
            raise ConfigError(f"da_vpt: init_images_per_class must be >= 1, got {self.init_images_per_class}")
        if self.kmeans_iters < 1:
            raise ConfigError(f"da_vpt: kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if self.prompt_init not in ("xavier", "uniform", "spt"):
            raise ConfigError(
                f"da_vpt: prompt_init must be 'xavier', 'uniform' or 'spt', got {self.prompt_init!r}"
            )
        if self.spt_sampler not in SAMPLERS:
            raise ConfigError(
                f"da_vpt: spt_sampler must be one of {list(SAMPLERS)}, got {self.spt_sampler!r}"
            )
        if self.spt_max_images < 1:
            raise ConfigError(f"da_vpt: spt_max_images must be >= 1, got {self.spt_max_images}")
        if self.spt_max_kmeans_tokens < max(self.prompt_length, self.num_proxy_prompts):
            raise ConfigError("da_vpt: spt_max_kmeans_tokens must be >= the prompt lengths")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"da_vpt: dropout must be in [0, 1), got {self.dropout}")
        if self.prompt_norm not in ("none", "l2"):
            raise ConfigError(f"da_vpt: prompt_norm must be 'none' or 'l2', got {self.prompt_norm!r}")


# ------------------------------------------------------------------------------------ loss and k-means


def class_positives(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) class indices or (B, C) multi-hot -> (B, C) bool; a multi-hot entry > 0.5 is positive."""
    if targets.dim() == 1 and not targets.is_floating_point():
        return F.one_hot(targets.long(), num_classes).bool()
    if targets.dim() == 2 and targets.shape[1] == num_classes:
        return targets > 0.5
    raise ValueError(
        f"targets must be (batch,) class indices or (batch, {num_classes}) multi-hot, got {tuple(targets.shape)}"
    )


def prompt_positives(
    class_pos: torch.Tensor, class_to_prompt: torch.Tensor, num_prompts: int
) -> torch.Tensor:
    """(B, C) class positives -> (B, M) prompt positives: prompt m is positive if a positive class maps to m."""
    mapping = F.one_hot(class_to_prompt.long(), num_prompts).to(torch.float32)
    return (class_pos.to(torch.float32) @ mapping) > 0


def proxy_anchor_loss(
    anchors: torch.Tensor,
    proxies: torch.Tensor,
    positives: torch.Tensor,
    *,
    alpha: float = 32.0,
    margin_pos: float = 0.1,
    margin_neg: float = -0.1,
    scale: float = 1.0,
) -> torch.Tensor:
    """DA-VPT's Proxy-Anchor loss (docs/methods.md, DA-VPT), normalised by the number of proxies M.

    ``anchors`` (B, D), ``proxies`` (M, D), ``positives`` (B, M) bool. ``s = scale * cos(anchor, proxy)``;
    each proxy adds ``log(1 + sum_pos exp(-alpha (s - margin_pos)))`` and
    ``log(1 + sum_neg exp(alpha (s - margin_neg)))``; the sum is divided by M. Empty sets contribute 0.
    """
    num_proxies = proxies.shape[0]
    sim = scale * (F.normalize(anchors.float(), dim=-1) @ F.normalize(proxies.float(), dim=-1).T)
    positives = positives.bool()
    minus_inf = torch.tensor(-math.inf, device=sim.device, dtype=sim.dtype)
    pos_logits = torch.where(positives, -alpha * (sim - margin_pos), minus_inf)
    neg_logits = torch.where(~positives, alpha * (sim - margin_neg), minus_inf)
    zero = sim.new_zeros(1, num_proxies)  # the "1 +" of log(1 + sum exp)
    pos_term = torch.logsumexp(torch.cat([zero, pos_logits]), dim=0)
    neg_term = torch.logsumexp(torch.cat([zero, neg_logits]), dim=0)
    return (pos_term.sum() + neg_term.sum()) / num_proxies


def cosine_kmeans(
    data: torch.Tensor,
    k: int,
    *,
    init: torch.Tensor | None = None,
    iters: int = 20,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of (N, F) rows after a parameter-free layer norm; returns (centroids (k, F), labels (N,)).

    Initial centroids are ``init`` (a warm start) or ``k`` distinct random rows (random unit vectors fill in
    when N < k). Each iteration assigns rows to the most cosine-similar centroid and moves every non-empty
    centroid to the normalised sum of its rows; it stops after ``iters`` or when no centroid moved by
    ``tol`` or more.
    """
    x = F.normalize(F.layer_norm(data.float(), data.shape[-1:]), dim=-1)
    if init is not None:
        centroids = F.normalize(init.float().to(x.device), dim=-1)
    else:
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        centroids = x[order[:k]]
        if centroids.shape[0] < k:
            extra = torch.randn(k - centroids.shape[0], x.shape[1], generator=generator).to(x.device)
            centroids = torch.cat([centroids, F.normalize(extra, dim=-1)])
    for _ in range(iters):
        labels = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        moved = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centroids)
        shift = (moved - centroids).norm(dim=1).max()
        centroids = moved
        if shift < tol:
            break
    return centroids, (x @ centroids.T).argmax(dim=1)


def format_mapping(class_to_prompt: torch.Tensor, limit: int = 64) -> str:
    """``"0:3 1:0 ..."`` (class:prompt), cut after ``limit`` classes."""
    values = class_to_prompt.tolist()
    text = " ".join(f"{c}:{m}" for c, m in enumerate(values[:limit]))
    return text + (f" ...(+{len(values) - limit})" if len(values) > limit else "")


# ------------------------------------------------------------------------------------------- method


@register_method
class DAVPT(TokenPrompts, Method):
    """DA-VPT; ``proxy_prompts`` (|G|, M, d) at the guided blocks, ``other_prompts`` (depth - |G|, L, d)."""

    name = "da_vpt"
    table_rank = 13
    config_class = DAVPTConfig
    paper = "DA-VPT: Semantic-Guided Visual Prompt Tuning (Ren et al., CVPR 2025)"
    supported_kinds = ("vit",)
    test_options = {"prompt_length": 2, "num_proxy_prompts": 2}
    needs_data_init = True

    config: DAVPTConfig

    def __init__(self, config: DAVPTConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.num_prefix_tokens = geometry.num_prefix_tokens
        self.guided = resolve_blocks(
            config.guided_layers if config.guided_layers is not None else [geometry.depth - 1],
            geometry.depth,
            self.name,
        )
        self.others = [i for i in range(geometry.depth) if i not in self.guided]
        self._guided_index = {block: g for g, block in enumerate(self.guided)}
        self._other_index = {block: o for o, block in enumerate(self.others)}
        self.has_cls = geometry.class_token
        self.prompt_dropout = nn.Dropout(config.dropout)
        self._captured: dict[Any, torch.Tensor] = {}
        self._reset_epoch_stats()

    # ---------------------------------------------------------------- attach and parameters

    def attach(self, backbone: nn.Module) -> None:
        config = self.config
        device, dtype = reference_device_dtype(backbone)
        d = self.geometry.embed_dim
        #: M actually used: capped at the number of classes (then the mapping is the identity)
        self.num_proxies = min(config.num_proxy_prompts, self.num_classes)
        self.identity_mapping = self.num_classes <= config.num_proxy_prompts
        self.proxy_prompts = nn.Parameter(
            torch.empty(len(self.guided), self.num_proxies, d, device=device, dtype=dtype)
        )
        has_others = bool(self.others) and config.prompt_length > 0
        self.other_prompts = (
            nn.Parameter(torch.empty(len(self.others), config.prompt_length, d, device=device, dtype=dtype))
            if has_others
            else None
        )
        self._init_prompts()
        head = backbone.get_submodule(classifier_name(backbone))  # the slot of every adapter's head
        feature_dim = int(getattr(unwrap_base_layers(head), "in_features", backbone.num_features))
        self.register_buffer("class_to_prompt", self._default_mapping(device))
        self.register_buffer("centroids", torch.zeros(self.num_proxies, feature_dim, device=device))

        adapter = adapter_for(backbone)
        lengths = {i: self.block_length(i) for i in range(self.geometry.depth)}
        first = min(i for i, length in lengths.items() if length > 0)
        # The paper anchor reads the proxy prompts' attention output in the guided blocks: keep it computed.
        keep = self.guided if config.anchor == "prompt_attn_out" else ()
        self.register_token_prompts(
            backbone, {i: n for i, n in lengths.items() if i >= first}, keep_prompt_outputs=keep
        )

        def qkv(index: int) -> nn.Module:
            try:
                return getattr(*adapter.qkv_slot(index, self.injections))
            except BackboneError as error:
                raise ConfigError(f"da_vpt: its kv biases and class query hook qkv; {error}") from None

        if config.bias_set != "none":
            self._qkv_part = unwrap_base_layers(qkv(0)).out_features // 3
            self.kv_bias_delta = nn.Parameter(
                torch.zeros(self.geometry.depth, 2 * self._qkv_part, device=device, dtype=dtype)
            )
            for index in range(len(adapter.blocks)):
                self.injections.hook(qkv(index), functools.partial(self._add_kv_bias, index))
        if config.prompt_mask:
            self._hook_prompt_mask(adapter, qkv)
        # Capture hooks run after the prompt hooks (and the mask), so they see the prompted sequence.
        for g, index in enumerate(self.guided):
            self.injections.change_block_input(index, functools.partial(self._capture_block_input, g))
            if self.has_cls:
                self.injections.hook(qkv(index), functools.partial(self._capture_cls_query, g))
            if config.anchor == "prompt_attn_out":
                try:
                    proj = adapter.attention(index).proj
                except BackboneError as error:
                    raise ConfigError(f"da_vpt: anchor='prompt_attn_out' reads attention parts; {error}") from None
                self.injections.pre_hook(proj, functools.partial(self._capture_attn_out, g))
        self.injections.pre_hook(head, self._capture_features)

    def _hook_prompt_mask(self, adapter: Any, qkv: Any) -> None:
        """Keep each prompted block's q, k, v and redo its prompt rows at ``attn.proj`` (see the module docstring)."""
        self._mask_parts: dict[int, Any] = {}
        self._mask_qkv: dict[int, torch.Tensor] = {}
        for index, count in self.prompts_in_block.items():
            if not count:
                continue
            try:
                parts = adapter.attention(index)  # families with rotary or relative positions have no plain parts
                plain = (
                    parts.qkv_bias is None
                    and parts.rotate is None
                    and parts.logit_bias is None
                    and parts.gate is None
                    and isinstance(parts.norm, nn.Identity)
                )
                reason = f"{type(parts.module).__name__} adds positions, biases or gates to it"
            except BackboneError as error:
                plain, reason = False, str(error)
            if not plain:
                raise ConfigError(
                    "da_vpt: prompt_mask recomputes the prompt rows of plain softmax attention; block "
                    f"{index}: {reason}. Turn prompt_mask off for this backbone"
                )
            self._mask_parts[index] = parts
            self.injections.hook(qkv(index), functools.partial(self._keep_qkv, index))
            self.injections.pre_hook(parts.proj, functools.partial(self._mask_prompt_rows, index))

    def _default_mapping(self, device: torch.device | None = None) -> torch.Tensor:
        """Identity when #classes <= M, else class c -> c mod M until the data init replaces it."""
        return torch.arange(self.num_classes, device=device) % self.num_proxies

    @torch.no_grad()
    def _init_prompts(self) -> None:
        tensors = [t for t in (self.proxy_prompts, self.other_prompts) if t is not None]
        for tensor in tensors:
            if self.config.prompt_init == "uniform":
                init_vpt_uniform_(tensor, self.geometry.patch_size, self.geometry.embed_dim)
            else:  # the code's xavier_uniform_ on the 3-D tensor, divided by 8 (also the pre-data SPT init)
                nn.init.xavier_uniform_(tensor)
                tensor.div_(8)

    def block_length(self, block: int) -> int:
        return self.num_proxies if block in self._guided_index else self.config.prompt_length

    def block_prompts(self, block: int, x: torch.Tensor) -> torch.Tensor:
        g = self._guided_index.get(block)
        if g is not None:
            prompts = self.proxy_prompts[g]
        elif self.other_prompts is not None:
            prompts = self.other_prompts[self._other_index[block]]
        else:
            prompts = x.new_zeros(0, x.shape[-1])
        return expand_prompts(self.normed(prompts), x.shape[0], self.prompt_dropout)

    def normed(self, prompts: torch.Tensor) -> torch.Tensor:
        """The prompts as inserted (before dropout): unit rows under ``prompt_norm="l2"``, as the code's
        ``F.normalize(p, dim=-1, eps=1e-6)``."""
        return F.normalize(prompts, dim=-1, eps=1e-6) if self.config.prompt_norm == "l2" else prompts

    def backbone_parameters_to_tune(self, backbone: nn.Module) -> Iterator[nn.Parameter]:
        if self.config.bias_set != "full_released":
            return
        adapter = adapter_for(backbone)
        for index, block in enumerate(adapter.blocks):
            for module, names in (
                (adapter.attention(index).proj, ("bias",)),
                (unwrap_base_layers(block.mlp).fc2, ("bias",)),
                (block.norm2, ("bias",)),
                (block.norm1, ("weight", "bias")),
            ):
                for name in names:
                    parameter = getattr(module, name, None)
                    if isinstance(parameter, nn.Parameter):
                        yield parameter
        if getattr(backbone, "cls_token", None) is not None:
            yield backbone.cls_token

    def no_weight_decay(self) -> set[str]:
        """timm's hook: the key/value bias deltas are biases (one row per block), undecayed as in the code."""
        return {"kv_bias_delta"} if self.config.bias_set != "none" else set()

    @classmethod
    def expected_num_parameters(cls, config: DAVPTConfig, geometry: Geometry) -> int | None:
        """Prompts and DA-VPT+ parameters, for a task with at least ``num_proxy_prompts`` classes."""
        d, depth = geometry.embed_dim, geometry.depth
        guided = 1 if config.guided_layers is None else len(config.guided_layers)
        total = guided * config.num_proxy_prompts * d + (depth - guided) * config.prompt_length * d
        if config.bias_set in ("kv", "full_released"):
            total += depth * 2 * d
        if config.bias_set == "full_released":
            total += depth * 5 * d + (d if geometry.class_token else 0)  # proj, fc2, norm2 biases; norm1
        return total

    # ---------------------------------------------------------------- hooks (bound methods: deepcopy-safe)

    def _add_kv_bias(self, block: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = F.pad(self.kv_bias_delta[block], (self._qkv_part, 0))  # [0 (q) | k | v]
        return self.on_own_rows(output, lambda rows: rows + delta.to(rows.dtype))

    def _keep_qkv(self, block: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.plan.token_prompts and self.adapter_name in self.routing.present():
            self._mask_qkv[block] = output

    def _mask_prompt_rows(self, block: int, module: nn.Module, args: tuple) -> tuple | None:
        """The prompt rows of the attention output, recomputed with the prompt queries seeing patches only
        (on this adapter's samples)."""
        qkv = self._mask_qkv.pop(block, None)
        x = args[0]
        if qkv is None or x.shape[1] != qkv.shape[1]:  # prompts off, or their rows not computed here
            return None
        return (self.on_own_rows(x, lambda own: self._masked(block, qkv, own)), *args[1:])

    def _masked(self, block: int, qkv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if qkv.shape[0] != x.shape[0]:  # a mixed batch: this adapter's samples
            groups = self.routing.groups((self.adapter_name,), qkv.shape[0])
            qkv = qkv[groups[0][1]]
        parts, start, count = self._mask_parts[block], self.num_prefix_tokens, self.prompts_in_block[block]
        batch, tokens, _ = qkv.shape
        q, k, v = qkv.reshape(batch, tokens, 3, parts.num_heads, parts.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = parts.q_norm(q), parts.k_norm(k)
        end = start + count
        rows = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, end:], v[:, :, end:], scale=parts.scale)
        rows = rows.transpose(1, 2).reshape(batch, count, parts.attn_dim).to(x.dtype)
        return torch.cat([x[:, :start], rows, x[:, end:]], dim=1)

    def _capturing(self) -> bool:
        """Training this adapter (every sample is its own: mixed batches are for inference)."""
        return self.training and self.plan.token_prompts and self.routing.present() == [self.adapter_name]

    def _capture_block_input(self, g: int, x: torch.Tensor) -> torch.Tensor:
        if self._capturing() and self.config.anchor == "patch_mean" and self.config.beta > 0:
            images = x[:, self.num_prefix_tokens + self.num_proxies :]
            self._captured[("patch", g)] = images.mean(dim=1)
        return x

    def _capture_cls_query(self, g: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._capturing() and self.config.lam > 0:
            self._captured[("cls", g)] = output[:, 0, : output.shape[-1] // 3]

    def _capture_attn_out(self, g: int, module: nn.Module, args: tuple) -> None:
        if self._capturing() and self.config.beta > 0:
            start = self.num_prefix_tokens
            self._captured[("attn", g)] = args[0][:, start : start + self.num_proxies]

    def _capture_features(self, module: nn.Module, args: tuple) -> None:
        if self._capturing():
            self._captured["features"] = args[0].detach()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_captured"] = {}  # activations of the last step hold an autograd graph; never copied
        if "_mask_qkv" in state:
            state["_mask_qkv"] = {}
        return state

    # ---------------------------------------------------------------- engine hooks

    def _reset_epoch_stats(self) -> None:
        self._class_sum: torch.Tensor | None = None
        self._class_count: torch.Tensor | None = None
        self._loss_sum = {"loss_patch": 0.0, "loss_cls": 0.0}
        self._loss_steps = 0
        self._loss_pending: list[torch.Tensor] = []

    def _accumulate_class_features(self, features: torch.Tensor, class_pos: torch.Tensor) -> None:
        weights = class_pos.to(torch.float32)
        if self._class_sum is None:
            self._class_sum = features.new_zeros(self.num_classes, features.shape[1], dtype=torch.float32)
            self._class_count = features.new_zeros(self.num_classes, dtype=torch.float32)
        self._class_sum += weights.T @ features.float()
        self._class_count += weights.sum(dim=0)

    def auxiliary_loss(self, model: nn.Module, targets: torch.Tensor) -> torch.Tensor | None:
        """``1/|G| sum_l (beta L_patch + lam L_cls)`` for the step whose forward just ran (None in eval mode)."""
        captured, self._captured = self._captured, {}
        if not self.training or "features" not in captured:
            return None
        config = self.config
        features = captured["features"]
        targets = targets.to(features.device)
        class_pos = class_positives(targets, self.num_classes)
        if class_pos.shape[0] != features.shape[0]:
            raise ValueError(f"{class_pos.shape[0]} targets for a forward of {features.shape[0]} images")
        self._accumulate_class_features(features, class_pos)
        if config.beta == 0 and config.lam == 0:
            return None
        pos = prompt_positives(class_pos, self.class_to_prompt, self.num_proxies)
        keep = pos.any(dim=1)  # all-negative (multi-label) images are left out
        options = dict(
            alpha=config.alpha,
            margin_pos=config.margin_pos,
            margin_neg=config.margin_neg,
            scale=config.proxy_scale,
        )
        zero = self.proxy_prompts.sum() * 0.0
        patch_terms, cls_terms = [], []
        for g in range(len(self.guided)):
            proxies = self.normed(self.proxy_prompts[g])
            if config.beta > 0:
                if config.anchor == "patch_mean":
                    anchors = captured[("patch", g)]
                else:
                    weights = pos.to(torch.float32)
                    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
                    anchors = torch.einsum("bm,bmd->bd", weights, captured[("attn", g)].float())
                patch_terms.append(proxy_anchor_loss(anchors[keep], proxies, pos[keep], **options))
            else:
                patch_terms.append(zero)
            if config.lam > 0 and self.has_cls:
                cls_terms.append(proxy_anchor_loss(captured[("cls", g)][keep], proxies, pos[keep], **options))
            else:
                cls_terms.append(zero)
        loss_patch = torch.stack(patch_terms).mean()
        loss_cls = torch.stack(cls_terms).mean()
        self._loss_pending.append(torch.stack([loss_patch.detach(), loss_cls.detach()]))
        self._loss_steps += 1
        return config.beta * loss_patch + config.lam * loss_cls

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """Re-run the class -> prompt k-means (warm start); report the mapping and the loss terms' means.

        Returns ``mapping`` (``"class:prompt ..."``), ``class_prompt`` (the same as ``{class: prompt}`` numbers,
        for logs that keep numbers only; up to 64 classes), ``mapping_updated`` (0/1), ``mapping_changed``
        (classes that moved), ``prompts_used``, the epoch means of ``loss_patch`` and ``loss_cls`` (unweighted)
        and their weights ``beta`` and ``lam``.
        """
        self._captured = {}
        updated, changed = False, 0
        if (
            not self.identity_mapping
            and epoch >= self.config.update_mapping_from_epoch
            and self._class_count is not None
            and bool((self._class_count > 0).any())
        ):
            updated, changed = self._update_mapping()
        info: dict[str, Any] = {
            "mapping": format_mapping(self.class_to_prompt),
            **self._mapping_numbers(),
            "mapping_updated": int(updated),
            "mapping_changed": changed,
            "prompts_used": int(self.class_to_prompt.unique().numel()),
        }
        if self._loss_pending:
            sums = torch.stack(self._loss_pending).sum(dim=0).tolist()
            info["loss_patch"] = sums[0] / self._loss_steps
            info["loss_cls"] = sums[1] / self._loss_steps
        info["beta"] = self.config.beta
        info["lam"] = self.config.lam
        self._reset_epoch_stats()
        return info

    def _mapping_numbers(self, limit: int = 64) -> dict[str, Any]:
        if self.num_classes > limit:
            return {}
        return {"class_prompt": dict(enumerate(self.class_to_prompt.tolist()))}

    @torch.no_grad()
    def _update_mapping(self) -> tuple[bool, int]:
        seen = self._class_count > 0
        means = self._class_sum[seen] / self._class_count[seen, None]
        warm = self.centroids if bool(self.centroids.abs().sum() > 0) else None
        centroids, labels = cosine_kmeans(
            means,
            self.num_proxies,
            init=warm,
            iters=self.config.kmeans_iters,
            tol=self.config.kmeans_tol,
            generator=torch.Generator().manual_seed(self.config.seed),
        )
        if self.num_proxies > 1 and labels.unique().numel() == 1:
            return False, 0  # all classes collapsed into one prompt: keep the previous mapping
        mapping = self.class_to_prompt.clone()
        mapping[seen.to(mapping.device)] = labels.to(mapping.device)
        changed = int((mapping != self.class_to_prompt).sum())
        self.class_to_prompt.copy_(mapping)
        self.centroids.copy_(centroids.to(self.centroids.device, self.centroids.dtype))
        return True, changed

    @torch.no_grad()
    def initialize_from_data(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
        """Initial mapping from class means of the frozen prompt-free model (and SPT prompts if asked).

        ``batches`` yields ``(images, targets)`` pairs (image tensors alone are accepted: then the mapping
        starts as ``c mod M`` and the first epoch-end update sets it from data).
        """
        started = time.perf_counter()
        config = self.config
        backbone = getattr(model, "backbone", model)
        wants_means = not self.identity_mapping
        spt_layers = [i for i in range(self.geometry.depth) if self.block_length(i) > 0]
        sampler = (
            PromptTokenSampler(
                spt_layers,
                [self.block_length(i) for i in spt_layers],
                config.spt_sampler,
                max_images=config.spt_max_images,
                max_kmeans_tokens=config.spt_max_kmeans_tokens,
                seed=config.seed,
            )
            if config.prompt_init == "spt"
            else None
        )
        class_count = torch.zeros(self.num_classes)
        class_sum: torch.Tensor | None = None
        images_used, labelled = 0, False
        catcher = LayerTokenCatcher(backbone, spt_layers if sampler is not None else [])
        was_training = model.training
        model.eval()
        try:
            with self.without_token_prompts(), catcher.hooked():
                for batch in batches if (wants_means or sampler is not None) else ():
                    images, targets = split_batch(batch)
                    take = torch.zeros(images.shape[0], dtype=torch.bool)
                    for_means = torch.zeros(images.shape[0], self.num_classes, dtype=torch.bool)
                    if wants_means and targets is not None:
                        labelled = True
                        for_means = self._images_for_class_means(targets.cpu(), class_count)
                        take |= for_means.any(dim=1)
                    spt_take = sampler.remaining if sampler is not None else 0
                    take[: max(spt_take, 0)] = True
                    if not bool(take.any()):
                        if self._init_done(wants_means, labelled, class_count, sampler):
                            break
                        continue
                    index = take.nonzero().squeeze(1)
                    chosen = images[index.to(images.device)]
                    features = backbone.forward_head(
                        backbone.forward_features(chosen), pre_logits=True
                    ).float()
                    images_used += chosen.shape[0]
                    if sampler is not None and spt_take > 0:
                        in_spt = (index < spt_take).to(chosen.device)
                        sampler.add({layer: t[in_spt] for layer, t in catcher.tokens.items()})
                    weights = for_means[index].to(torch.float32)
                    if bool(weights.any()):
                        if class_sum is None:
                            class_sum = torch.zeros(self.num_classes, features.shape[1])
                        class_sum += weights.T @ features.cpu()
                        class_count += weights.sum(dim=0)
                    if self._init_done(wants_means, labelled, class_count, sampler):
                        break
        finally:
            model.train(was_training)

        info: dict[str, Any] = {}
        if sampler is not None:
            tokens = sampler.result()
            for layer, rows in zip(spt_layers, tokens, strict=True):
                target = (
                    self.proxy_prompts[self._guided_index[layer]]
                    if layer in self._guided_index
                    else self.other_prompts[self._other_index[layer]]
                )
                target.copy_(rows.to(target.device, target.dtype))
            info.update({"spt_images": sampler.images, "spt_tokens": sampler.tokens_seen})
        if self.identity_mapping:
            info["mapping_init"] = "identity"
        elif class_sum is None:
            info["mapping_init"] = "c mod M (no labels given)"
        else:
            self._initial_mapping(class_sum, class_count)
            info["mapping_init"] = "kmeans"
        info.update(
            {
                "init_images": images_used,
                "init_seconds": round(time.perf_counter() - started, 4),
                "mapping": format_mapping(self.class_to_prompt),
                "prompts_used": int(self.class_to_prompt.unique().numel()),
            }
        )
        return info

    def _images_for_class_means(self, targets: torch.Tensor, class_count: torch.Tensor) -> torch.Tensor:
        """(B, C) bool: the classes each image adds to (only classes still under the per-class cap)."""
        class_pos = class_positives(targets, self.num_classes)
        counts = class_count.clone()
        chosen = torch.zeros_like(class_pos)
        cap = self.config.init_images_per_class
        for b in range(class_pos.shape[0]):
            wanted = class_pos[b] & (counts < cap)
            chosen[b] = wanted
            counts += wanted.to(counts.dtype)
        return chosen

    def _init_done(
        self, wants_means: bool, labelled: bool, class_count: torch.Tensor, sampler: PromptTokenSampler | None
    ) -> bool:
        means_done = (
            not wants_means or not labelled or bool((class_count >= self.config.init_images_per_class).all())
        )
        return means_done and (sampler is None or sampler.remaining <= 0)

    def _initial_mapping(self, class_sum: torch.Tensor, class_count: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(self.config.seed)
        seen = class_count > 0
        means = class_sum[seen] / class_count[seen, None]
        centroids, labels = cosine_kmeans(
            means,
            self.num_proxies,
            iters=self.config.kmeans_iters,
            tol=self.config.kmeans_tol,
            generator=generator,
        )
        mapping = torch.randint(
            0, self.num_proxies, (self.num_classes,), generator=generator
        )  # unseen classes
        mapping[seen] = labels.cpu()
        self.class_to_prompt.copy_(mapping.to(self.class_to_prompt.device))
        self.centroids.copy_(centroids.to(self.centroids.device, self.centroids.dtype))
