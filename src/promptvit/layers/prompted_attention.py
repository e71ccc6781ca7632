"""Self-attention with extra, learned logits in the softmax (EPT's prompted softmax).

Notation: ``u`` are the scaled logits ``scale * q @ k^T`` of one head, shape (B, H, N, N) with query i on the
rows; ``P`` is a prompt of shape (N, d_p) holding raw learned logits, shared over heads and the batch.

EPT (Zu et al., MedIA 2024, eq. 5) concatenates ``P`` in front of the logits on the key axis, takes the
softmax over all ``d_p + N`` entries, drops the ``d_p`` prompt columns *without renormalising* and multiplies
by V. For query i of head h this is the attention output times a gate in (0, 1)::

    out_i = sum_j exp(u_ij) v_j / (sum_j exp(u_ij) + sum_k exp(P_ik))
          = sigmoid(LSE_j u_ij - LSE_k P_ik) * softmax(u_i) V

Only ``LSE_k P_ik`` enters, so the fast path (:func:`prompted_sdpa`) adds ONE key with value 0 whose logit
for query i is ``LSE_k P_ik``: that adds exactly ``sum_k exp(P_ik)`` to the denominator. The logit is carried
by extra head channels instead of an additive mask (q_i gains ``LSE_i / scale``, the extra key gains 1, every
real key 0), so the call is a plain mask-free ``scaled_dot_product_attention`` that the fused (flash) kernels
accept in training and inference, and its cost does not depend on d_p. Under bf16/fp16 autocast the
per-token LSE would round to the query dtype (near log 100 ~ 4.6 bf16 keeps steps of 1/32, far coarser than
the per-token spread of small prompts), so it is kept in float32 and split over two channels, ``hi`` (its
rounding to the query dtype) and ``lo`` (the remainder, rounded): the kernel sums the products in float32,
so ``hi + lo`` restores the value to about 16 bits. :func:`reference_prompted_attention` materialises the
concatenation and is the oracle the tests hold the fast path against. ``add`` (a full learned N x N bias)
still needs a float mask, so it cannot run under a flash-only backend.

Families whose attention is not plain softmax over ``scale * q @ k^T`` keep their maths: q and k are the
family's (rotated by position on Eva: EVA-02, DINOv3, RoPE ViTs), and a family's additive logit bias ``b``
(Beit's relative position bias) is part of ``u``: ``u = scale * q @ k^T + b``. EPT's prompt columns get no
such bias, so ``pure_cat`` is ``softmax([P, u])`` with the prompt columns dropped; the fast path passes
``b`` (padded with a zero column for the extra key) as SDPA's mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention

from promptvit.backbones import (
    AttentionParts,
    BackboneError,
    PartsFromCall,
    all_rows,
    attend,
    unwrap_base_layers,
)
from promptvit.layers.base import AdapterRouting, PerAdapter, TunerLayer

Way = Literal["pure_cat", "multi_cat", "add", "multiply"]
WAYS: tuple[str, ...] = ("pure_cat", "multi_cat", "add", "multiply")


def multi_cat_alpha(logits: torch.Tensor) -> torch.Tensor:
    """EPT's Multi_Cat scale: the range of each query's logits over the keys, shape (..., N, 1). Not detached."""
    return logits.amax(dim=-1, keepdim=True) - logits.amin(dim=-1, keepdim=True)


def reference_prompted_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    way: Way,
    prompt: torch.Tensor | None = None,
    logit_bias: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain, materialised EPT attention (no dropout); q, k, v of shape (B, H, N, D).

    ``u = scale * q @ k^T``, plus ``attn_bias`` (a family's own logit bias, broadcastable to (B, H, N, N)):

    * ``pure_cat``: ``softmax([P, u])[..., d_p:] @ v`` (prompt columns dropped, no renormalisation);
    * ``multi_cat``: as pure_cat with prompt row i scaled by ``alpha_i = max_j u_ij - min_j u_ij``;
    * ``add``: ``softmax(u + logit_bias) @ v`` with ``logit_bias`` of shape (N, N);
    * ``multiply``: ``softmax(u * (1 + temperature)) @ v`` with ``temperature`` of shape (N, 1).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * scale
    if attn_bias is not None:
        logits = logits + attn_bias
    if way == "add":
        attn = (logits + logit_bias).softmax(dim=-1)
    elif way == "multiply":
        attn = (logits * (1 + temperature)).softmax(dim=-1)
    elif way in ("pure_cat", "multi_cat"):
        d_p = prompt.shape[-1]
        p = prompt.expand(*logits.shape[:-1], d_p)
        if way == "multi_cat":
            p = multi_cat_alpha(logits) * p
        attn = torch.cat([p, logits], dim=-1).softmax(dim=-1)[..., d_p:]
    else:
        raise ValueError(f"unknown EPT way {way!r}; expected one of {WAYS}")
    return attn @ v


def prompted_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    way: Way,
    prompt: torch.Tensor | None = None,
    logit_bias: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same maths as :func:`reference_prompted_attention`, through ``scaled_dot_product_attention``.

    ``scale=None`` is SDPA's default ``1/sqrt(D)`` (timm's ``Attention.scale``). Attention dropout drops
    entries of the full softmax as the reference would before slicing; dropping the extra zero-value column
    (or EPT's prompt columns) changes nothing, so both agree in distribution.
    """
    if way == "multiply":
        # logits_ij * (1 + t_i) == scale * ((1 + t_i) q_i) . k_j: scale the queries, no mask needed.
        # With a family bias b: (u_ij + b_ij) * (1 + t_i), so b is scaled the same way.
        mask = None if attn_bias is None else (attn_bias * (1 + temperature)).to(q.dtype)
        q = q * (1 + temperature).to(q.dtype)
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if way == "add":
        mask = logit_bias if attn_bias is None else logit_bias + attn_bias
        return scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout_p, scale=scale)
    # The prompt's LSE is computed in float32 (or wider) with autocast off: rounded to bf16 the per-token
    # values would collapse onto a few steps of 1/32 near log d_p.
    with torch.autocast(q.device.type, enabled=False):
        if way == "pure_cat":
            prompt_lse = torch.logsumexp(_at_least_float32(prompt), dim=-1)  # (N,): same for every sample, head
        elif way == "multi_cat":
            # alpha needs the range of each query's logits, so they are materialised once (no softmax, no grad
            # through a (B, H, N, d_p) tensor beyond the logsumexp).
            s = q.shape[-1] ** -0.5 if scale is None else scale
            logits = (_at_least_float32(q) @ _at_least_float32(k).transpose(-2, -1)) * s
            if attn_bias is not None:
                logits = logits + _at_least_float32(attn_bias)
            prompt_lse = torch.logsumexp(multi_cat_alpha(logits) * _at_least_float32(prompt), dim=-1)  # (B, H, N)
        else:
            raise ValueError(f"unknown EPT way {way!r}; expected one of {WAYS}")
    return _sdpa_with_lse_key(q, k, v, prompt_lse, scale=scale, dropout_p=dropout_p, attn_bias=attn_bias)


def lse_channels(prompt_lse: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """(..., N) logits -> (..., N, 2) channels ``hi, lo`` in ``dtype`` with ``scale * (hi + lo) ~= lse``.

    ``hi`` is ``lse / scale`` rounded to ``dtype`` and ``lo`` the rounded remainder, so a kernel that sums
    products in float32 recovers the logit to about twice the precision of ``dtype`` (``lo`` is 0 when
    ``dtype`` is as wide as the logits).
    """
    target = _at_least_float32(prompt_lse) / scale
    hi = target.to(dtype)
    lo = (target - hi.to(target.dtype)).to(dtype)
    return torch.stack([hi, lo], dim=-1)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or as it is if wider (float64 tests keep their precision); autocast does not apply."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _sdpa_with_lse_key(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_lse: torch.Tensor,
    *,
    scale: float | None,
    dropout_p: float,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA over the real keys plus one zero-value key whose logit for query i is ``prompt_lse[..., i]``.

    No mask: the logit rides on two extra head channels (see the module docstring). V gets the same width
    (fused kernels need equal head dims) and the extra output channels, always 0, are dropped. A family's
    ``attn_bias`` becomes the mask, with a zero column for the extra key.
    """
    batch, heads, rows, dim = q.shape
    s = dim**-0.5 if scale is None else scale
    channels = lse_channels(prompt_lse, s, q.dtype).expand(batch, heads, rows, 2)
    q = torch.cat([q, channels], dim=-1)
    k = F.pad(k, (0, 2))  # real keys: 0 in the extra channels
    extra_key = torch.zeros(1, 1, 1, dim + 2, dtype=k.dtype, device=k.device)
    extra_key[..., dim:] = 1.0
    k = torch.cat([k, extra_key.expand(batch, heads, 1, dim + 2)], dim=-2)
    v = F.pad(v, (0, 2, 0, 1))  # the extra key's value and the extra channels are 0
    mask = None if attn_bias is None else F.pad(attn_bias, (0, 1)).to(q.dtype)
    return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=s)[..., :dim]


#: the extra key's logit for a sample without concatenated prompts in a mixed batch: its softmax weight is
#: exactly 0 in float32 (exp underflows), and ``lse / scale`` stays finite in float16 query channels
NO_PROMPT_LSE = -1000.0


class AttentionPrompt(nn.Module):
    """One adapter's learned logits in one prompted attention, by way:

    * ``pure_cat`` / ``multi_cat``: ``prompt`` of shape (num_tokens, prompt_length), N(0, init_std);
    * ``add``: ``logit_bias`` of shape (num_tokens, num_tokens), zeros (identity at init);
    * ``multiply``: ``temperature`` of shape (num_tokens, 1), zeros; logits are multiplied by ``1 + t``.
    """

    def __init__(
        self,
        num_tokens: int,
        way: Way = "pure_cat",
        prompt_length: int = 100,
        init_std: float = 0.02,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if way not in WAYS:
            raise ValueError(f"unknown EPT way {way!r}; expected one of {WAYS}")
        self.way = way
        self.prompt_length = prompt_length
        factory = {"device": device, "dtype": dtype}
        if way in ("pure_cat", "multi_cat"):
            self.prompt = nn.Parameter(torch.empty(num_tokens, prompt_length, **factory))
            nn.init.normal_(self.prompt, std=init_std)
        elif way == "add":
            self.logit_bias = nn.Parameter(torch.zeros(num_tokens, num_tokens, **factory))
        else:
            self.temperature = nn.Parameter(torch.zeros(num_tokens, 1, **factory))

    def learned(self) -> dict[str, torch.Tensor]:
        """The tensor of its way under the keyword :func:`prompted_sdpa` takes it by."""
        if self.way in ("pure_cat", "multi_cat"):
            return {"prompt": self.prompt}
        if self.way == "add":
            return {"logit_bias": self.logit_bias}
        return {"temperature": self.temperature}

    def extra_repr(self) -> str:
        length = f", prompt_length={self.prompt_length}" if self.way.endswith("_cat") else ""
        return f"way={self.way}{length}"


class PromptedAttention(TunerLayer):
    """Replaces a timm ``Attention``; the frozen original is kept as ``base_layer``, each adapter's learned
    logits (:class:`AttentionPrompt`) in ``prompts``.

    Frozen weights therefore only gain a prefix in the state dict (``attn.qkv.weight`` becomes
    ``attn.base_layer.qkv.weight``). Inputs must have exactly ``num_tokens`` tokens (a prompt has one row per
    token position). ``parts_from_call`` (the backbone adapter's ``attention_parts_from_call``) reads the
    family's parts from each call's arguments (Eva's rotary table, Beit's shared bias, Swin's shift mask).

    A batch where one adapter's prompts apply to every sample runs that adapter's fast path
    (:func:`prompted_sdpa`); a mixed batch gathers each sample's log-sum-exp, temperature and logit bias and
    runs one SDPA call for all samples (a sample without prompts gets an extra key of weight 0).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        parts_from_call: PartsFromCall,
        num_tokens: int,
        img_size: tuple[int, int] | None = None,
        routing: AdapterRouting | None = None,
    ) -> None:
        super().__init__(base_layer, routing)
        self.parts_from_call = parts_from_call
        try:
            self.parts_from_call(base_layer, {})
        except BackboneError as error:
            raise TypeError(f"PromptedAttention needs a timm fused-qkv Attention module: {error}") from error
        self.num_tokens = num_tokens
        self.img_size = img_size
        self.prompts = PerAdapter()

    def add_adapter(
        self, name: str, way: Way = "pure_cat", prompt_length: int = 100, init_std: float = 0.02
    ) -> AttentionPrompt:
        weight = unwrap_base_layers(self.parts.qkv).weight
        self.prompts[name] = AttentionPrompt(
            self.num_tokens, way, prompt_length, init_std, device=weight.device, dtype=weight.dtype
        )
        return self.prompts[name]

    @property
    def parts(self) -> AttentionParts:
        """The parts without call arguments (no rotary table, no shared bias)."""
        return self.parts_from_call(self.base_layer, {})

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}"

    def _routed_prompt(self) -> AttentionPrompt | None:
        """The prompt of the adapter every sample uses (for analysis), or None without prompts here."""
        groups = self.routing.groups(self.prompts)
        if len(groups) > 1 or (groups and groups[0][1] is not None):
            raise ValueError("attention weights are read for one adapter at a time, not in a mixed batch")
        return self.prompts[groups[0][0]] if groups else None

    def attention_weights(self, x: torch.Tensor, **call: Any) -> torch.Tensor:
        """Attention over the real keys, (B, H, N, N), for analysis; rows sum to the EPT gate, not to 1.

        ``call``: the arguments the block passes its attention (``rope=`` on Eva, ``shared_rel_pos_bias=``
        on Beit), so the weights are those of the forward.
        """
        parts = self.parts_from_call(self.base_layer, call)
        prompt = self._routed_prompt()
        if prompt is None:
            return parts.probabilities(x)
        q, k, _ = parts.heads(x)
        n = k.shape[-2]
        # The reference computes attn @ v; with v = identity it returns the attention matrix itself.
        identity = torch.eye(n, dtype=q.dtype, device=q.device).expand(*q.shape[:2], n, n)
        return reference_prompted_attention(
            q, k, identity, way=prompt.way, scale=parts.scale, attn_bias=parts.logit_bias, **prompt.learned()
        )

    def token_scale(self, x: torch.Tensor, **call: Any) -> torch.Tensor:
        """EPT's patch-wise scale per head and query token, (B, H, N): the gate applied to the attention output."""
        return self.attention_weights(x, **call).sum(dim=-1)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False, **call: Any
    ) -> torch.Tensor:
        if not self.routing.groups(self.prompts, x.shape[0]):  # no adapter prompts here: timm's own attention
            if attn_mask is None and not is_causal:
                return self.base_layer(x, **call)  # timm < 1.0.1x attention takes no mask arguments
            return self.base_layer(x, attn_mask=attn_mask, is_causal=is_causal, **call)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("EPT prompted attention does not support attention masks or is_causal")
        return self.forward_selected(x, all_rows, **call)

    def forward_selected(
        self, x: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor], **call: Any
    ) -> torch.Tensor:
        """``select(self(x))`` with queries (and the prompt rows that belong to them) for the kept tokens only.

        ``select`` acts on the token axis (-2); every token still serves as key and value. ``call``: the
        family's attention arguments (rotary table, shared relative position bias).
        """
        parts = self.parts_from_call(self.base_layer, call)
        groups = self.routing.groups(self.prompts, x.shape[0])
        if not groups:
            return attend(parts, x, select=select)
        n = x.shape[1]
        if n != self.num_tokens:
            built = f" for {self.img_size[0]}x{self.img_size[1]} images" if self.img_size else ""
            raise ValueError(
                f"EPT prompted attention expects {self.num_tokens} tokens but received {n}: the prompt has one "
                f"row per token and the model was built{built} (geometry.img_size={self.img_size}). Feed "
                "inputs of that size, or wrap a backbone built for the new size (its prompts get new rows)."
            )
        if len(groups) == 1 and groups[0][1] is None:  # one adapter for every sample: its fast path
            prompt = self.prompts[groups[0][0]]
            # Every learned tensor has one row per query token (axis -2), so it is selected with the queries.
            learned = {name: select(tensor) for name, tensor in prompt.learned().items()}

            def core(q, k, v, scale, dropout_p, logit_bias=None):
                return prompted_sdpa(
                    q, k, v, way=prompt.way, scale=scale, dropout_p=dropout_p, attn_bias=logit_bias, **learned
                )

        else:

            def core(q, k, v, scale, dropout_p, logit_bias=None):
                return self._mixed_sdpa(groups, select, q, k, v, scale, dropout_p, logit_bias)

        return attend(parts, x, select=select, core=core)

    def _mixed_sdpa(
        self,
        groups: list[tuple[str, torch.Tensor | None]],
        select: Callable[[torch.Tensor], torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None,
        dropout_p: float,
        attn_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """Each sample with its own adapter's way and tensors, in one SDPA call: per-sample query temperature
        (``multiply``), logit bias (``add``) and extra-key log-sum-exp (``pure_cat``, ``multi_cat``)."""
        batch, heads, rows_q, dim = q.shape
        s = dim**-0.5 if scale is None else scale
        temperature = extra_bias = lse = None
        for name, rows in groups:
            prompt = self.prompts[name]
            (learned,) = (select(tensor) for tensor in prompt.learned().values())
            if prompt.way == "multiply":
                temperature = q.new_zeros(batch, 1, rows_q, 1) if temperature is None else temperature
                temperature[rows] = learned.to(q.dtype)
            elif prompt.way == "add":
                extra_bias = q.new_zeros(batch, 1, rows_q, k.shape[-2]) if extra_bias is None else extra_bias
                extra_bias[rows] = learned.to(q.dtype)
            else:
                with torch.autocast(q.device.type, enabled=False):
                    if lse is None:
                        dtype = _at_least_float32(q).dtype
                        lse = torch.full((batch, heads, rows_q), NO_PROMPT_LSE, device=q.device, dtype=dtype)
                    prompt_rows = _at_least_float32(learned)
                    if prompt.way == "pure_cat":
                        lse[rows] = torch.logsumexp(prompt_rows, dim=-1).to(lse.dtype)
                    else:  # multi_cat: alpha from each sample's own logits
                        q_rows, k_rows = _at_least_float32(q[rows]), _at_least_float32(k[rows])
                        logits = (q_rows @ k_rows.transpose(-2, -1)) * s
                        if attn_bias is not None:
                            bias = attn_bias if attn_bias.shape[0] == 1 else attn_bias[rows]
                            logits = logits + _at_least_float32(bias)
                        alpha = multi_cat_alpha(logits)
                        lse[rows] = torch.logsumexp(alpha * prompt_rows, dim=-1).to(lse.dtype)
        mask = attn_bias
        if temperature is not None:
            q = q * (1 + temperature)
            mask = None if mask is None else mask * (1 + temperature)
        if extra_bias is not None:
            mask = extra_bias if mask is None else mask + extra_bias
        if lse is None:
            mask = None if mask is None else mask.to(q.dtype)
            return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return _sdpa_with_lse_key(q, k, v, lse, scale=scale, dropout_p=dropout_p, attn_bias=mask)
