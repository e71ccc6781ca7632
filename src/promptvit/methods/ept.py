"""EPT: Embedded Prompt Tuning (Zu, Xie, Zhao, Li, Ma; Medical Image Analysis 97, 2024).

EPT does not add tokens. Each prompted block gets a learned prompt ``P`` of shape (num_tokens, d_p), one row
per token position (CLS and register rows included), shared over heads and the batch. The prompt is
concatenated as raw logits in front of the attention logits, the softmax runs over all ``d_p + N`` entries
and the prompt columns are dropped without renormalising (paper eq. 5; the released code). For query i this
gates the attention output by ``sigmoid(LSE_j u_ij - LSE_k P_ik)``: the paper's "patch-wise scaling".
See ``promptvit.layers.prompted_attention`` for the maths and the exact single-padded-key SDPA fast path.

Embedding ways (paper Fig. 5, "Prompt Embedding Way"; only Pure_Cat exists in the official code):

* ``pure_cat`` (default, what the released configs run): as above.
* ``multi_cat`` (reported best in the paper): prompt row i is scaled by ``alpha_i = max_j u_ij - min_j u_ij``,
  the range of query i's scaled logits, per sample, head and query, *not detached*; then as pure_cat.
* ``add`` and ``multiply``: the paper writes ``P_E + K^T Q`` and ``P_E (.) K^T Q`` without saying how a
  (d_p x N) prompt meets an (N x N) matrix. Our explicit choices (so ``prompt_length`` is unused for them):

  - ``add``: a learned (N x N) additive logit bias per prompted layer, shared over heads, zero-initialised
    (a bias constant along the key axis would cancel in the softmax, so it has to be a full matrix);
    N * N parameters per layer.
  - ``multiply``: a learned per-query temperature ``t`` of shape (N, 1) per prompted layer, shared over
    heads, zero-initialised: logits of query i are multiplied by ``1 + t_i``; N parameters per layer.

  Both compute exactly timm's attention at initialisation (up to SDPA kernel rounding for ``add``).

Prompt length: ``prompt_length`` is d_p (the released configs use 100). ``relative_length``, when set,
overrides it with ``round(relative_length * embed_dim / num_patches)``: the paper's conversion for parameter
parity with VPT (a VPT token costs embed_dim per layer, an EPT column about num_patches); for ViT-B/16 at
224 px that is ``relative * 768 / 196 ~= 3.92 * relative`` (relative 1 -> d_p 4, as in paper Sec. 4.3).

Layers: ``layers=None`` prompts every block (EPT-Deep, the paper's setting); ``[0]`` is EPT-Shallow; any
set of block indices works (e.g. the deepest k for the depth ablation).

Resolution: the prompt rows follow the token count of the model as built (``geometry.img_size``); inputs of
another size, including with ``dynamic_img_size``, raise an error naming both token counts.

Swin and SwinV2 (docs/methods.md, "VPT on Swin", EPT): the prompted attention is each block's window attention,
so the prompt has one row per position of a window and every window of the block shares it; the logits
``u`` include the relative position bias and, in shifted blocks, the shift mask (the prompt columns get
neither). ``layers`` counts blocks across the stages; ``relative_length`` is refused (no single patch count).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from promptvit.backbones import BackboneAdapter, BackboneError, Geometry, adapter_for
from promptvit.layers.prompted_attention import WAYS, AttentionPrompt, PromptedAttention
from promptvit.methods.base import ConfigError, Method, MethodConfig, register_method


@dataclasses.dataclass
class EPTConfig(MethodConfig):
    prompt_length: int = 100  # d_p; ignored by the "add" and "multiply" ways
    layers: list[int] | None = None  # prompted block indices; None = every block (EPT-Deep), [0] = shallow
    way: Literal["pure_cat", "multi_cat", "add", "multiply"] = "pure_cat"
    relative_length: float | None = None  # overrides prompt_length: round(relative * embed_dim / num_patches)
    init_std: float = 0.02  # prompt init N(0, init_std); "add"/"multiply" start at zero

    def validate(self) -> None:
        if isinstance(self.prompt_length, bool) or not isinstance(self.prompt_length, int):
            raise ConfigError(f"ept: prompt_length must be an int, got {self.prompt_length!r}")
        if self.prompt_length < 1:
            raise ConfigError(f"ept: prompt_length must be >= 1, got {self.prompt_length}")
        if self.way not in WAYS:
            raise ConfigError(f"ept: way must be one of {list(WAYS)}, got {self.way!r}")
        if self.relative_length is not None and not self.relative_length > 0:
            raise ConfigError(f"ept: relative_length must be > 0, got {self.relative_length}")
        if not self.init_std >= 0:
            raise ConfigError(f"ept: init_std must be >= 0, got {self.init_std}")
        if self.layers is not None:
            self.layers = list(self.layers)
            if not self.layers:
                raise ConfigError("ept: layers must name at least one block (or be None for every block)")
            bad = [i for i in self.layers if isinstance(i, bool) or not isinstance(i, int)]
            if bad:
                raise ConfigError(f"ept: layers must be block indices (ints), got {bad}")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"ept: layers has duplicate indices: {self.layers}")


def _prompt_length(config: EPTConfig, geometry: Geometry) -> int:
    if config.relative_length is None:
        return config.prompt_length
    if geometry.num_patches == 0:
        raise ConfigError(
            f"ept: relative_length converts with the patch count of a ViT, which {geometry.architecture} does not "
            "have (its attention sees windows of different sizes per stage); give prompt_length instead"
        )
    length = round(config.relative_length * geometry.embed_dim / geometry.num_patches)
    if length < 1:
        raise ConfigError(
            f"ept: relative_length={config.relative_length} gives prompt length {length} "
            f"(= round(relative * {geometry.embed_dim} / {geometry.num_patches})); use a larger value"
        )
    return length


def _layer_indices(config: EPTConfig, depth: int) -> list[int]:
    if config.layers is None:
        return list(range(depth))
    bad = [i for i in config.layers if not 0 <= i < depth]
    if bad:
        raise ConfigError(
            f"ept: layers {bad} are out of range for a backbone with {depth} blocks (valid: 0..{depth - 1}; "
            f"e.g. the deepest k blocks are list(range({depth} - k, {depth})))"
        )
    return sorted(config.layers)


@register_method
class EPT(Method):
    name = "ept"
    table_rank = 10
    config_class = EPTConfig
    paper = "EPT: Embedded Prompt Tuning (Zu et al., MedIA 2024)"
    test_options = {"prompt_length": 3}

    def __init__(self, config: EPTConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        # d_p only matters for the concatenating ways ("add" and "multiply" have no prompt columns).
        self.prompt_length = _prompt_length(config, geometry) if config.way.endswith("_cat") else 0

    @classmethod
    def supports(cls, adapter: BackboneAdapter) -> bool:
        """Token models, and families whose transformer blocks give their attention parts (Swin's window
        attention; not SAM's or MaxxVit's, whose attention maths promptvit does not re-compute)."""
        if adapter.kind == "vit":
            return True
        if not adapter.has_transformer_blocks:
            return False
        try:
            adapter.attention_parts_from_call(0)
        except BackboneError:
            return False
        return True

    def attach(self, backbone: nn.Module) -> None:
        adapter = adapter_for(backbone)
        self.layer_indices = _layer_indices(self.config, len(adapter.blocks))
        for index in self.layer_indices:
            try:  # the family's rotary positions and relative position bias take part (Eva, Beit)
                parts_from_call = adapter.attention_parts_from_call(index)
            except BackboneError as error:
                raise ConfigError(f"ept: prompted attention re-computes the block's attention; {error}") from None
            parent, name = adapter.attention_slot(index)

            def prompted(attn: nn.Module, parts_from_call=parts_from_call, index=index) -> PromptedAttention:
                return PromptedAttention(
                    attn,
                    num_tokens=adapter.attention_tokens(index),  # a window's tokens on Swin
                    img_size=self.geometry.img_size,
                    parts_from_call=parts_from_call,
                    routing=self.routing,
                )

            try:
                layer = self.injections.layer(parent, name, PromptedAttention, prompted)
            except TypeError as error:
                raise ConfigError(f"ept: cannot prompt block {index}: {error}") from error
            layer.add_adapter(
                self.adapter_name,
                way=self.config.way,
                prompt_length=self.prompt_length,
                init_std=self.config.init_std,
            )

    def injected_layers(self) -> list[PromptedAttention]:
        """The prompted attentions holding this adapter's prompts, block by block."""
        entries = self.injections.entries("replace")
        return [entry.target for entry in entries if isinstance(entry.target, PromptedAttention)]

    def attention_prompts(self) -> list[AttentionPrompt]:
        """This adapter's learned logits in each prompted block, block by block."""
        return [layer.prompts[self.adapter_name] for layer in self.injected_layers()]

    def tuned_from_block(self) -> int:
        """Blocks before the first prompted one are frozen."""
        return min(self.layer_indices)

    @classmethod
    def expected_num_parameters(cls, config: EPTConfig, geometry: Geometry) -> int | None:
        if geometry.kind != "vit":
            return None
        layers = len(_layer_indices(config, geometry.depth))
        n = geometry.num_tokens
        if config.way == "add":
            return layers * n * n
        if config.way == "multiply":
            return layers * n
        return layers * n * _prompt_length(config, geometry)
