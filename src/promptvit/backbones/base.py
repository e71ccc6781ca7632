"""The backbone interface: what methods may ask of a timm model, one adapter class per model family.

A :class:`BackboneAdapter` wraps one timm model (it owns no weights and changes nothing) and answers the
questions methods, ``PromptModel``, serving and analysis need, so none of them reads a timm class's
internals. Families register with :func:`register_adapter` by timm model class; :func:`adapter_for` picks
the adapter of the most specific registered class in the model's MRO, so a subclass family (e.g. a
distilled ViT) is one more module and one more registration.

Token models (``kind == "vit"``) expose the token sequence (``embed``), the blocks with their attention
parts and MLP, the prefix tokens and where prompts may be inserted, the final norm and the head.
Convolutional models (``kind == "cnn"``) expose their stages and the layers after the last stage.

:class:`AttentionParts` plus :func:`attend` are the ONE implementation of multi-head self-attention that
prompted attention, row-selected blocks, multi-task serving and the attention analysis share.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Protocol

import timm.layers
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from promptvit.backbones.geometry import Geometry
from promptvit.errors import BackboneError, listed

Select = Callable[[torch.Tensor], torch.Tensor]
#: ``core(q, k, v, scale, dropout_p) -> (B, H, N_q, head_dim)``: the attention of the heads. Where the parts
#: carry a ``logit_bias`` it is passed as the keyword ``logit_bias`` too.
AttentionCore = Callable[..., torch.Tensor]


#: normalisation layers, whose affine parameters norm tuning tunes: torch's and timm's own (those an older
#: timm release lacks are left out)
NORM_LAYERS: tuple[type[nn.Module], ...] = tuple(
    layer
    for layer in (
        nn.LayerNorm,  # timm's LayerNorm, LayerNorm2d and their Act/Fp32 variants derive from it
        nn.GroupNorm,
        nn.modules.batchnorm._BatchNorm,  # timm's BatchNormAct2d too
        nn.modules.instancenorm._InstanceNorm,
        getattr(nn, "RMSNorm", None),
        *(
            getattr(timm.layers, name, None)
            for name in ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm", "SimpleNorm2d")
        ),
    )
    if layer is not None
)


def all_rows(tokens: torch.Tensor) -> torch.Tensor:
    return tokens


def sdpa_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    dropout_p: float,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain softmax attention through torch's SDPA (what timm's fused path computes)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=logit_bias, dropout_p=dropout_p, scale=scale)


@dataclasses.dataclass(frozen=True)
class AttentionParts:
    """The pieces of one self-attention module, read once by the family adapter.

    ``qkv`` is a fused projection whose output is ``[q | k | v]``; ``q_norm``/``k_norm`` act per head;
    ``norm`` acts on the concatenated heads before ``proj``; ``gate`` (or None) is a sigmoid gate on that
    output computed from the attention input. Modules are called as modules, so injected layers (LoRA) and
    hooks on them take part.

    Families whose attention is not plain fill the optional fields: ``qkv_bias`` is added to the fused
    projection's output (EVA/BEiT keep their q/v biases outside the qkv module), ``rotate`` is applied to q
    and k after their norms (rotary positions), ``logit_bias`` is added to the scaled logits, broadcastable
    to (B, H, N, N) (BEiT's relative position bias), or with one entry per window, (W, H, N, N), where the
    batch holds the W windows of each image in turn (Swin's shifted-window mask, see :func:`bias_for_batch`).
    Tensors there are read per call (see :class:`PartsFromCall`).
    """

    module: nn.Module
    qkv: nn.Module
    num_heads: int
    head_dim: int
    scale: float
    q_norm: nn.Module
    k_norm: nn.Module
    attn_drop: nn.Module
    norm: nn.Module
    gate: nn.Module | None
    proj: nn.Module
    proj_drop: nn.Module
    qkv_bias: torch.Tensor | None = None
    rotate: Callable[[torch.Tensor], torch.Tensor] | None = None
    logit_bias: torch.Tensor | None = None

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def sdpa_scale(self) -> float | None:
        """``scale`` to pass to SDPA: None when it is SDPA's own default ``head_dim ** -0.5``."""
        return None if self.scale == self.head_dim**-0.5 else self.scale

    def heads(
        self, x: torch.Tensor, qkv_delta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v for input ``x`` (B, N, D), each (B, heads, N, head_dim), q/k norms applied.

        ``qkv_delta`` (broadcastable to the fused projection's output) is added before the split.
        """
        batch, tokens, _ = x.shape
        qkv = self.qkv(x)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        if qkv_delta is not None:
            qkv = qkv + qkv_delta
        q, k, v = (
            qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rotate is not None:
            q, k = self.rotate(q).type_as(v), self.rotate(k).type_as(v)
        return q, k, v

    def probabilities(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention probabilities (B, H, N, N) in float32, as timm's unfused path computes them."""
        q, k, _ = self.heads(x)
        logits = ((q * self.scale) @ k.transpose(-2, -1)).float()
        if self.logit_bias is not None:
            logits = logits + bias_for_batch(self.logit_bias, logits.shape[0]).float()
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask.float()
        return logits.softmax(dim=-1)


def bias_for_batch(bias: torch.Tensor, batch: int) -> torch.Tensor:
    """A logit bias for a batch of ``batch`` rows: a per-window bias (W, H, N, N), W dividing the batch and
    neither 1 nor the batch, is repeated over the images (their windows come one image after the other)."""
    if bias.dim() == 4 and bias.shape[0] not in (1, batch):
        if batch % bias.shape[0]:
            raise ValueError(f"a bias for {bias.shape[0]} windows does not fit a batch of {batch} windows")
        bias = bias.repeat(batch // bias.shape[0], 1, 1, 1)
    return bias


def attend(
    parts: AttentionParts,
    x: torch.Tensor,
    *,
    select: Select = all_rows,
    core: AttentionCore = sdpa_core,
    qkv_delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """``select(attention(x))``: every token is a key and value, only the selected rows are queries.

    ``select`` acts on the token axis (-2); ``core`` replaces the softmax attention of the heads (EPT's
    prompted softmax, per-sample serving tables); ``qkv_delta`` is added to the fused projection.
    """
    q, k, v = parts.heads(x, qkv_delta)
    dropout_p = parts.attn_drop.p if parts.module.training else 0.0
    if parts.logit_bias is None:
        out = core(select(q), k, v, parts.sdpa_scale, dropout_p)
    else:  # the bias rows belong to the query rows
        bias = bias_for_batch(parts.logit_bias, q.shape[0])
        out = core(select(q), k, v, parts.sdpa_scale, dropout_p, logit_bias=select(bias))
    out = parts.norm(out.transpose(1, 2).flatten(2))
    if parts.gate is not None:
        out = out * parts.gate(select(x)).sigmoid()
    return parts.proj_drop(parts.proj(out))


class BlockPlan(Protocol):
    """What the block loop asks before each block (``promptvit.layers.block_plan.BlockPlan`` implements it).

    ``before_block`` gives a token sequence's input with the prompts inserted and block-input prompts
    applied; a family that carries prompts beside its maps asks ``inserts`` (the tokens a block puts in, or
    None) and ``skips_prompt_outputs`` instead.
    """

    def before_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor: ...

    def output_rows(self, index: int) -> Select | None: ...

    def inserts(self, index: int, x: torch.Tensor) -> torch.Tensor | None: ...

    def puts_in_prompts(self, index: int) -> bool: ...

    def skips_prompt_outputs(self, index: int) -> bool: ...


#: ``parts(attention module, keyword arguments of one call) -> AttentionParts``: how a module that replaces
#: a block's attention reads its parts at each call (rotary tables and shared biases arrive as arguments)
PartsFromCall = Callable[[nn.Module, dict[str, Any]], AttentionParts]


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the classifier module of any timm model (``get_classifier`` located by identity)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    if isinstance(name, (tuple, list)):  # two heads (distilled ViT): the first is the class head
        name = name[0] if name else None
    modules = dict(model.named_modules())
    if name in modules:
        return name
    target = model.get_classifier()
    for module_name, module in modules.items():
        if module is target and module_name:
            return module_name
    raise BackboneError(f"cannot find the classifier module of {type(model).__name__}")


def size_option(size: tuple[int, ...]) -> int | list[int]:
    """A timm size option as written by hand: ``32`` for (32, 32), else the list."""
    return size[0] if len(set(size)) == 1 else list(size)


def mlp_ratio(hidden: int, width: int) -> float:
    """The ``mlp_ratio`` for which timm builds an MLP ``hidden`` wide (``int(width * mlp_ratio)``)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block every parameter a module registers goes to the meta device (no memory, no
    initialisation), while the other tensors its constructor makes stay real (as ``accelerate``'s
    ``init_empty_weights``): for constructors that read tensor values, which a whole meta build cannot."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _needs_real_tensors(error: Exception) -> bool:
    return isinstance(error, (RuntimeError, NotImplementedError)) and "meta" in str(error)


def build_structure(architecture: str, options: dict[str, Any]) -> nn.Module:
    """``timm.create_model(architecture, **options)`` without weights, the global RNG untouched: on the meta
    device; where the constructor reads tensor values (timm < 1.0.10: drop-path rates, index tables), with
    only its parameters on the meta device; where it runs the model (a hybrid ViT probes its stem), on the
    CPU."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(architecture, pretrained=False, **options)
    except (RuntimeError, NotImplementedError) as error:
        if not _needs_real_tensors(error):
            raise
    with torch.random.fork_rng(devices=[]):
        try:
            with parameters_on_meta():
                return timm.create_model(architecture, pretrained=False, **options)
        except (RuntimeError, NotImplementedError) as error:
            if not _needs_real_tensors(error):
                raise
        return timm.create_model(architecture, pretrained=False, **options)


class BackboneAdapter:
    """The interface between one timm model family and everything above it.

    Subclasses set ``kind`` and implement the questions that apply to it; the defaults refuse with a
    :class:`BackboneError` naming the family. An adapter is cheap: build one wherever needed with
    :func:`adapter_for`.
    """

    #: "vit" (token sequences through blocks) or "cnn" (feature maps through stages)
    kind: ClassVar[str]
    #: short family name used in messages and the family table
    family: ClassVar[str]
    #: small random-init builds with the family's architecture options, ``name -> (timm model, build
    #: options, input size)``: the method matrix and ``promptvit backbones`` run every method on them
    tiny_builds: ClassVar[dict[str, tuple[str, dict[str, Any], int]]] = {}
    #: why a method that needs a token model cannot run here, where "a cnn" would mislead (Swin)
    kind_note: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _unsupported(self, what: str) -> BackboneError:
        return BackboneError(f"{type(self.model).__name__} ({self.family}) has no {what}")

    # ------------------------------------------------------------------ every family

    def geometry(self) -> Geometry:
        raise NotImplementedError

    def classifier_name(self) -> str:
        """Dotted name of the classifier module (``head``, ``fc``, ``classifier``...)."""
        return classifier_name(self.model)

    def get_classifier(self) -> nn.Module:
        return self.model.get_submodule(self.classifier_name())

    def classifier_modules(self) -> list[nn.Module]:
        """Every module that maps features to logits (two for a distilled ViT); all are tuned as the head."""
        return [self.get_classifier()]

    def classifier_slots(self) -> list[tuple[nn.Module, str]]:
        """``(parent, attribute)`` of every classifier module, in :meth:`classifier_modules` order."""
        parent_name, _, child = self.classifier_name().rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        return [(parent, child)]

    def set_classifier(self, module: nn.Module) -> None:
        """Replace the classifier module in place."""
        parent, child = self.classifier_slots()[0]
        setattr(parent, child, module)

    def num_classes(self) -> int:
        """Outputs of the classifier: a linear or 1x1-conv classifier's width (timm 1.0.9's ``reset_classifier``
        leaves ``num_classes`` behind on some models, e.g. RegNet and SAM's ViT), else timm's ``num_classes``."""
        head = unwrap_base_layers(self.get_classifier())
        if isinstance(head, nn.Linear):
            return head.out_features
        if isinstance(head, nn.Conv2d):
            return head.out_channels
        return self.model.num_classes

    def reset_classifier(self, num_classes: int) -> None:
        """timm's ``reset_classifier(num_classes)``, with ``num_classes`` kept in step (older timm releases
        leave it behind on some models, e.g. RegNet and SAM's ViT in 1.0.9)."""
        self._timm_reset_classifier(num_classes)
        self.model.num_classes = num_classes

    def _timm_reset_classifier(self, num_classes: int) -> None:
        """timm's ``reset_classifier``; a failure inside it (timm 1.0.9's PVTv2 reads an attribute it never
        set) becomes a BackboneError saying what to do."""
        import timm

        try:
            self.model.reset_classifier(num_classes)
        except Exception as error:  # noqa: BLE001  (whatever timm's code raises, the user gets one line)
            raise BackboneError(
                f"{type(self.model).__name__}.reset_classifier({num_classes}) fails in timm {timm.__version__} "
                f"({type(error).__name__}: {error}): keep the model's own head (num_classes=None), or use a newer "
                "timm"
            ) from error

    def new_classifiers(self, num_classes: int) -> list[nn.Module]:
        """The classifiers timm's ``reset_classifier(num_classes)`` builds, one per :meth:`classifier_slots`
        entry; the model is left as it was.

        timm may build more than the classifier anew (a pooling layer, the head module holding it, every
        branch's head): whatever it replaced is put back, so the backbone's own modules stay its own. A slot
        timm builds nothing for (RepViT's new head has no distillation head unless asked) gets a copy of the
        first new classifier.
        """
        model = self.model
        names = {id(module): name for name, module in model.named_modules()}
        slots = [".".join(filter(None, [names[id(parent)], child])) for parent, child in self.classifier_slots()]
        before = dict(model.named_modules())
        previous = model.num_classes
        try:
            self._timm_reset_classifier(num_classes)
        finally:
            after = dict(model.named_modules())
            replaced = [name for name, module in before.items() if name and after.get(name) is not module]
            for name in replaced:
                if not any(name.startswith(f"{outer}.") for outer in replaced):  # outermost ones only
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child, before[name])
            model.num_classes = previous
        made = [after.get(name) for name in slots]
        if made[0] is None:
            raise BackboneError(f"{type(model).__name__}.reset_classifier builds no {slots[0]}")
        return [module if module is not None else copy.deepcopy(made[0]) for module in made]

    def head_input(self, features: torch.Tensor) -> torch.Tensor:
        """What the classifier receives from ``forward_features``' output (pooling, norms before the head)."""
        return self.model.forward_head(features, pre_logits=True)

    def pre_logits(self, images: torch.Tensor) -> torch.Tensor:
        """What the classifier receives: ``head_input(forward_features(x))``."""
        return self.head_input(self.model.forward_features(images))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`pre_logits`' output: ``classify(pre_logits(x)) == model(x)``."""
        return self.get_classifier()(features)

    def head_reads_pre_logits(self) -> bool:
        """Whether the logits are :meth:`classify` of :meth:`pre_logits`, so the pre-logit features can be
        cached and a head fitted on them; false where the head also reads other activations."""
        return True

    def input_module(self) -> nn.Module:
        """The first module that sees the images (a pixel prompt is added at its input)."""
        raise self._unsupported("input module")

    # ------------------------------------------------------------------ rebuilding

    #: options of :meth:`observed_options` that follow from others (an MLP ratio from a width): dropped from
    #: :meth:`build_options` when the rebuild matches without them
    derived_options: ClassVar[tuple[str, ...]] = ()

    def observed_options(self) -> dict[str, Any]:
        """``timm.create_model`` options as this model's modules show them, defaults included.

        Families add what changes their geometry or weights (image and patch size, depth, width, heads, prefix
        tokens, pooling, window size...); the generic answer is the classifier size.
        """
        return {"num_classes": int(self.model.num_classes)}

    def build_options(self, architecture: str) -> dict[str, Any]:
        """The options that make ``timm.create_model(architecture, **options)`` this model's architecture.

        The observed options that differ from a default build of ``architecture``, verified by
        :meth:`rebuild_mismatch`; ``BackboneError`` says what cannot be rebuilt.
        """
        observed = self.observed_options()
        default = type(self)(build_structure(architecture, {})).observed_options()
        options = {k: v for k, v in observed.items() if k == "num_classes" or default.get(k) != v}
        fewer = {k: v for k, v in options.items() if k not in self.derived_options}
        if fewer != options and self.rebuild_mismatch(architecture, fewer) is None:
            return fewer
        problem = self.rebuild_mismatch(architecture, options)
        if problem is not None:
            raise BackboneError(problem)
        return options

    def rebuild_mismatch(self, architecture: str, options: dict[str, Any]) -> str | None:
        """Why ``timm.create_model(architecture, **options)`` would not have this model's architecture, or None.

        Built on the meta device (no weights) and compared by state-dict names and shapes, geometry and
        :meth:`observed_options`.
        """
        call = f"timm.create_model({architecture!r}{''.join(f', {k}={v!r}' for k, v in options.items())})"
        try:
            rebuilt = build_structure(architecture, options)
        except (RuntimeError, TypeError, ValueError, AssertionError) as error:
            return f"{call} fails ({(str(error).splitlines() or [type(error).__name__])[0]})"
        if type(rebuilt) is not type(self.model):
            return f"{call} builds a {type(rebuilt).__name__}, not a {type(self.model).__name__}"
        own = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        new = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
        differences = [
            f"{k}: {own.get(k, 'absent')} vs {new.get(k, 'absent')}"
            for k in sorted(own.keys() | new.keys())
            if own.get(k) != new.get(k)
        ]
        other = type(self)(rebuilt)
        mine, theirs = self.geometry().to_dict(), other.geometry().to_dict()
        differences += [f"{k}: {v} vs {theirs[k]}" for k, v in mine.items() if theirs[k] != v]
        mine, theirs = self.observed_options(), other.observed_options()
        differences += [f"{k}: {v} vs {theirs.get(k)}" for k, v in mine.items() if theirs.get(k) != v]
        if differences:
            return f"{call} differs from the model ({listed(differences)})"
        return None

    # ------------------------------------------------------------------ token models

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks in order (a staged family with attention blocks, Swin, lists them too)."""
        raise self._unsupported("transformer blocks")

    @property
    def has_transformer_blocks(self) -> bool:
        """Whether :attr:`blocks` lists transformer blocks with ``qkv_slot``/``mlp_slot`` (every token model)."""
        return self.kind == "vit"

    def block_width(self, block: int) -> int:
        """Token width of ``blocks[block]`` (the same for every block of a plain ViT)."""
        return self.geometry().embed_dim

    def attention_tokens(self, block: int) -> int:
        """Tokens one attention call of ``blocks[block]`` sees without prompts (a window's, on Swin)."""
        return self.geometry().num_tokens

    #: whether :meth:`forward_blocks` carries prompt tokens beside the feature maps itself (``plan.inserts``:
    #: Swin's windows), instead of as rows of one token sequence (``plan.before_block``)
    routes_token_prompts: ClassVar[bool] = False

    @property
    def has_block_loop(self) -> bool:
        """Whether the model runs this family through :meth:`embed` and :meth:`forward_blocks` (its block
        loop) rather than timm's ``forward``: token models, and families that route prompts themselves."""
        return self.kind == "vit" or self.routes_token_prompts

    @property
    def supports_token_prompts(self) -> bool:
        """Whether prompt tokens can go into the blocks: one token sequence, or the family's own route."""
        return self.has_block_loop

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (class, distillation, register tokens)."""
        raise self._unsupported("token sequence")

    @property
    def prompt_position(self) -> int:
        """Where inserted tokens go in the block input: after the prefix tokens, before the patches.

        Inserted tokens get no position embedding, so nobody's position shifts.
        """
        return self.num_prefix_tokens

    @property
    def patch_embed(self) -> nn.Module:
        """The module whose output is the patch tokens before any position embedding."""
        raise self._unsupported("patch embedding")

    @property
    def patch_size(self) -> tuple[int, int]:
        """(height, width) in pixels of one patch token (what VPT's initialisation bound is computed from)."""
        return tuple(self.patch_embed.patch_size)

    @property
    def final_norm(self) -> nn.Module:
        """The norm after the last block; prompts are stripped at its input."""
        raise self._unsupported("final norm")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The token sequence the first block receives (embedding, position, prefix tokens, pre-norm)."""
        raise self._unsupported("token embedding")

    def block_arguments(self, image_size: tuple[int, int] | None = None) -> Callable[[int], dict[str, Any]]:
        """``arguments(i)``: the keyword arguments ``blocks[i]`` takes besides the tokens in one forward of
        images of ``image_size`` (default: the size the model was built for), e.g. a rotary table or a shared
        relative position bias; none by default."""
        return lambda index: {}

    def forward_blocks(
        self,
        tokens: torch.Tensor,
        plan: BlockPlan | None = None,
        start: int = 0,
        end: int | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run ``blocks[start:end]`` as the model would, with ``plan``'s changes (the model's block loop).

        Before each block ``plan.before_block(i, x)`` may change its input (prompt tokens); a block for which
        ``plan.output_rows(i)`` gives a row selection computes only those rows (:meth:`forward_block_rows`).
        Blocks are called as modules, so hooks on them run; timm's gradient checkpointing is honoured.
        ``image_size``: of the images the tokens come from, where positions depend on it (dynamic size).
        """
        blocks = self.blocks
        end = len(blocks) if end is None else end
        arguments = self.block_arguments(image_size)
        checkpointing = getattr(self.model, "grad_checkpointing", False) and torch.is_grad_enabled()
        for index in range(start, end):
            select = None
            if plan is not None:
                tokens = plan.before_block(index, tokens)
                select = plan.output_rows(index)
            if select is not None:
                run, args, kwargs = self.forward_block_rows, (index, tokens, select), {}
            else:
                run, args, kwargs = blocks[index], (tokens,), arguments(index)
            if checkpointing:
                tokens = checkpoint(run, *args, use_reentrant=False, **kwargs)
            else:
                tokens = run(*args, **kwargs)
        return tokens

    def attention(self, block: int) -> AttentionParts:
        """The attention parts of ``blocks[block]`` (through injected wrappers that keep a ``base_layer``)."""
        raise self._unsupported("attention parts")

    def attention_slot(self, block: int) -> tuple[nn.Module, str]:
        """``(parent, attribute)`` holding the attention module of ``blocks[block]`` (to replace it)."""
        raise self._unsupported("attention")

    def attention_parts_from_call(self, block: int) -> PartsFromCall:
        """How ``blocks[block]``'s attention reads its parts at each call: ``parts(attention, call)``.

        ``attention`` is the family's own module (under any injected wrapper) and ``call`` the keyword
        arguments it receives, so rotary tables (Eva) and shared relative position biases (Beit) take part.
        What an injected attention (EPT) and the attention analysis use: their softmax is then the model's.
        """
        raise self._unsupported("attention parts")

    def mlp_slot(self, block: int) -> tuple[nn.Module, str]:
        """``(parent, attribute)`` holding the MLP of ``blocks[block]``."""
        raise self._unsupported("MLP")

    def supports_selected_rows(self, block: int) -> bool:
        """Whether :meth:`forward_block_rows` can compute only some output rows of ``blocks[block]``."""
        return False

    def forward_block_rows(self, block: int, x: torch.Tensor, select: Select) -> torch.Tensor:
        """``select(blocks[block](x))`` without computing the dropped rows (keys/values still see all)."""
        raise self._unsupported("row-selected block forward")

    def reads_class_token_only(self) -> bool:
        """Whether the head reads row 0 of the final norm's output and nothing else."""
        return False

    def qkv_slot(self, block: int, injections: Any = None) -> tuple[nn.Module, str]:
        """``(attention module, attribute)`` of the fused ``[q | k | v]`` projection of ``blocks[block]``.

        Only where the attention calls it as a module, so a wrapped projection (LoRA) or a hook on it is
        not bypassed. A family that can switch its attention to such a call records the switch in
        ``injections`` (a method's ledger, so disable/unload undo it); otherwise a BackboneError says why.
        """
        raise self._unsupported("fused qkv projection")

    def qkv_head_first(self, block: int) -> int:
        """0 where the output of :meth:`qkv_slot`'s projection is ``[q | k | v]``; the number of heads where it
        holds the heads one after another, each ``[q | k | v]`` (timm's ``head_first`` attention)."""
        return 0

    def prepare_inserted_tokens(self, injections: Any) -> None:
        """Record in ``injections`` (a method's ledger) the changes that let blocks take inserted tokens.

        Needed where attention indexes tokens by position (rotary embeddings, relative position bias):
        inserted tokens (at :attr:`prompt_position`) then get no position and patch tokens keep theirs.
        The ledger owns them, so disabling or unloading the method undoes them. Most families need none.
        """

    def tuned_with_last_blocks(self) -> list[nn.Module]:
        """Modules after the blocks that belong with the last ones (final norms) for partial tuning."""
        raise self._unsupported("blocks")

    def prefix_state_names(self, cut: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Name prefixes of the parameters/buffers that compute the input of ``blocks[cut]``."""
        raise self._unsupported("token prefix")

    def prefix_modules(self, cut: int) -> list[nn.Module]:
        """The modules that compute the input of ``blocks[cut]`` (for cache keys)."""
        raise self._unsupported("token prefix")

    # ------------------------------------------------------------------ convolutional models

    @property
    def stages(self) -> list[nn.Module]:
        raise self._unsupported("stages")

    def after_stages(self) -> list[nn.Module]:
        """Layers between the last stage and the pooling that belong with the last stage."""
        return []

    def last_stages(self, count: int) -> list[nn.Module]:
        """What tuning the last ``count`` stages tunes: those stages and the layers after them."""
        return [*self.stages[-count:], *self.after_stages()]

    def stage_input_shape(self, img_size: tuple[int, int], stage: int) -> tuple[int, ...]:
        """(C, H, W) of ``stages[stage]``'s input for ``img_size`` images (one probing forward of zeros).

        A BackboneError says so where the stage does not run exactly once on one tensor per forward (a module
        list the model iterates, a stage called per branch): a prompt at its input would not apply once.
        """
        return self._stage_input_shape(stage, self._stage_inputs(img_size)[stage])

    def stage_output_map(self, output: torch.Tensor) -> torch.Tensor:
        """A stage's output as a (B, C, H, W) map of image positions.

        Channels come first whatever the family's layout (timm's ``output_fmt``: Swin's stages give
        (B, H, W, C)).
        """
        if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            return output.permute(0, 3, 1, 2)
        return output

    @torch.no_grad()
    def _stage_inputs(self, img_size: tuple[int, int]) -> list[list[Any]]:
        """The first argument of every call of every stage in one probing forward of a zero image."""
        stages = self.stages
        seen: dict[int, list[Any]] = {id(stage): [] for stage in stages}

        def record(module: nn.Module, args: tuple) -> None:
            seen[id(module)].append(args[0] if args else None)

        reference = next(self.model.parameters())
        images = torch.zeros(1, 3, *img_size, device=reference.device, dtype=reference.dtype)
        probe_forward_features(self.model, images, stages, record)
        return [seen[id(stage)] for stage in stages]

    def _stage_input_shape(self, index: int, inputs: list[Any]) -> tuple[int, ...]:
        if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
            return tuple(inputs[0].shape[1:])
        runs = (
            "never runs in forward_features"
            if not inputs
            else f"runs {len(inputs)} times per forward"
            if len(inputs) > 1
            else f"takes a {type(inputs[0]).__name__}, not one activation tensor"
        )
        stage = self.stages[index]
        raise BackboneError(
            f"stage {index} ({type(stage).__name__}) of {type(self.model).__name__} {runs}, so no prompt can be "
            "added at its input"
        )


def probe_forward_features(
    model: nn.Module, images: torch.Tensor, modules: Sequence[nn.Module], pre_hook: Callable[..., Any]
) -> None:
    """One eval-mode ``forward_features(images)`` with ``pre_hook`` on ``modules``; the model is left as it was."""
    was_training = model.training
    handles = [module.register_forward_pre_hook(pre_hook) for module in modules]
    try:
        model.eval()
        model.forward_features(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


class TimmTokenAdapter(BackboneAdapter):
    """Token families built the timm ViT way (ViT, EVA, BEiT): ``patch_embed``, ``blocks``, ``norm`` and
    ``num_prefix_tokens`` are public attributes of the model, read here once for all of them."""

    kind = "vit"

    def input_module(self) -> nn.Module:
        return self.model.patch_embed

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def patch_embed(self) -> nn.Module:
        return self.model.patch_embed

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    def attention_slot(self, block: int) -> tuple[nn.Module, str]:
        return self.model.blocks[block], "attn"

    def mlp_slot(self, block: int) -> tuple[nn.Module, str]:
        return self.model.blocks[block], "mlp"

    derived_options = ("mlp_ratio",)

    def observed_options(self) -> dict[str, Any]:
        """The options every timm token model takes under these names (families add their own)."""
        geometry = self.geometry()
        return {
            **super().observed_options(),
            "img_size": size_option(geometry.img_size),
            "patch_size": size_option(geometry.patch_size),
            "embed_dim": geometry.embed_dim,
            "depth": geometry.depth,
            "num_heads": geometry.num_heads,
            "mlp_ratio": mlp_ratio(geometry.mlp_hidden, geometry.embed_dim),
            "qkv_bias": geometry.qkv_bias,
            "global_pool": geometry.global_pool,
            "dynamic_img_size": geometry.dynamic_img_size,
        }

    def token_geometry(self, *, num_heads: int, mlp_hidden: int, qkv_bias: bool) -> Geometry:
        """The geometry every timm token model states the same way; the family gives what it reads itself."""
        model = self.model
        return Geometry(
            kind="vit",
            architecture=type(model).__name__,
            embed_dim=model.embed_dim,
            depth=len(model.blocks),
            num_heads=num_heads,
            num_prefix_tokens=model.num_prefix_tokens,
            num_patches=model.patch_embed.num_patches,
            img_size=tuple(model.patch_embed.img_size),
            patch_size=tuple(model.patch_embed.patch_size),
            mlp_hidden=mlp_hidden,
            qkv_bias=qkv_bias,
            global_pool=model.global_pool,
            dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
            class_token=getattr(model, "cls_token", None) is not None,
            pos_embed_len=model.pos_embed.shape[1] if getattr(model, "pos_embed", None) is not None else 0,
        )


_ADAPTERS: dict[type, type[BackboneAdapter]] = {}


def register_adapter(*model_classes: type) -> Callable[[type[BackboneAdapter]], type[BackboneAdapter]]:
    """Class decorator: ``adapter_for`` uses this adapter for models of these timm classes."""

    def decorate(adapter: type[BackboneAdapter]) -> type[BackboneAdapter]:
        for model_class in model_classes:
            if model_class in _ADAPTERS:
                raise ValueError(
                    f"{model_class.__name__} already has the adapter {_ADAPTERS[model_class].__name__}"
                )
            _ADAPTERS[model_class] = adapter
        return adapter

    return decorate


def unregister_adapter(*model_classes: type) -> None:
    """Remove the adapters registered for these timm classes (the undo of ``register_adapter``)."""
    missing = [cls.__name__ for cls in model_classes if cls not in _ADAPTERS]
    if missing:
        raise ValueError(f"no adapter is registered for {', '.join(missing)}")
    for model_class in model_classes:
        del _ADAPTERS[model_class]


def registered_adapters() -> dict[type, type[BackboneAdapter]]:
    """timm model class -> adapter class, for every registered family."""
    return dict(_ADAPTERS)


def adapter_class_for(model: nn.Module) -> type[BackboneAdapter] | None:
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The adapter of the most specific registered class of ``model``; BackboneError if none."""
    adapter = adapter_class_for(model)
    if adapter is None:
        families = ", ".join(sorted({a.family for a in _ADAPTERS.values()}))
        raise BackboneError(
            f"unsupported backbone {type(model).__name__}: promptvit handles timm {families} models"
        )
    return adapter(model)


def unwrap_base_layers(module: nn.Module) -> nn.Module:
    """Follow ``base_layer`` links of injected tuner layers down to the backbone's own module."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module
