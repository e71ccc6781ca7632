"""The method contract and the registry.

A tuning method is one module: a config dataclass plus a ``Method`` subclass, registered with
``@register_method``. ``PromptModel`` (in ``promptvit.model``) is the only caller of the hooks below, and
the training engine sees methods only through ``PromptModel`` and these hooks. Every change a method makes to
the backbone goes through its ``injections`` ledger (:mod:`promptvit.layers.base`), so it can be disabled
and removed; what generic code needs to know (data init, auxiliary loss, per-epoch logs, how it batches
across tasks, its frozen prefix) is declared here, never looked up by method name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from promptvit.backbones import BackboneAdapter, Geometry, classifier_name
from promptvit.errors import ConfigError
from promptvit.layers.base import (
    AdapterRouting,
    ForwardPlan,
    Injections,
    TunerLayer,
    on_rows,
)


@dataclasses.dataclass
class PeftForm:
    """A method as a peft adapter: ``peft.LoraConfig`` options and its tensors under their names in the backbone
    (``blocks.0.attn.qkv.lora_A.weight``); the model adds the head as ``modules_to_save``."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclasses.dataclass
class MethodConfig:
    """Options of one method. Subclasses add typed fields with defaults."""

    #: options whose default changed meaning after run records existed. Run identities (the protocols'
    #: config and train hashes) leave options at their default out, so they always hold these options'
    #: resolved values instead: a record made under the old default is then never taken for the new one.
    identity_options: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, options: dict[str, Any], method: str = "") -> MethodConfig:
        """Build from a plain dict, naming any unknown option and the known ones."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for method '{method or cls.__name__}'; "
                f"known options: {sorted(known)}"
            )
        hints = typing.get_type_hints(cls)
        for key, value in options.items():
            _check_type(method or cls.__name__, key, value, hints[key])
        return cls(**options)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for values out of range; subclasses override."""


def _check_type(method: str, key: str, value: Any, hint: Any) -> None:
    """Reject wrong types (a string for an int, ``True`` for a count, NaN for a float) with the option's name."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"option '{key}' of method '{method}' must be a finite number, got {value!r}")
    if not _fits(value, hint):
        raise ConfigError(f"option '{key}' of method '{method}' must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    """``list[int] | None`` as "a list of ints or None", ``int`` as "int"."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin in (list, tuple):
        items = [a for a in typing.get_args(hint) if a is not Ellipsis][:1]
        if items and typing.get_origin(items[0]) is typing.Literal:
            return f"a list of entries of {list(typing.get_args(items[0]))}"
        return f"a list of {_describe(items[0])}s" if items else "a list"
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    for option in allowed:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return True
        if base is typing.Literal and value in typing.get_args(option):
            return True
        if base in (list, tuple) and isinstance(value, (list, tuple)):
            items = typing.get_args(option)[:1]  # list[int], tuple[int, ...]: every item an int
            return not items or all(_fits(item, items[0]) for item in value)
        if isinstance(value, bool) and base in (int, float):  # True is an int in Python, never a count here
            continue
        if base is float and isinstance(value, (int, float)):
            return True
        if isinstance(base, type) and base not in (list, tuple) and isinstance(value, base):
            return True
    return False


class Method(nn.Module):
    """Base class of every tuning method.

    Lifecycle, driven by ``PromptModel``: the backbone is frozen, then ``attach`` injects layers or hooks
    (new parameters are trainable), then ``backbone_parameters_to_tune`` names frozen backbone parameters
    to unfreeze. The classifier head is always tuned and is handled by ``PromptModel``.
    Parameters a method owns directly (prompts) live on the method module; parameters of injected layers
    live in those layers (as in Hugging Face peft).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    paper: ClassVar[str] = ""
    #: backbone kinds the method can attach to: "vit", "cnn"
    supported_kinds: ClassVar[tuple[str, ...]] = ("vit",)
    #: whether the whole backbone runs in train mode while training (dropout, BatchNorm statistics)
    trains_backbone: ClassVar[bool] = False
    #: whether the freshly wrapped model computes exactly what the plain backbone computes (zero-init methods)
    identity_at_init: ClassVar[bool] = False
    #: options the shared test matrix uses to keep the method small (e.g. a short prompt)
    test_options: ClassVar[dict[str, Any]] = {}
    #: row position in result tables (the built-ins follow EPT's Table 1, then the methods it lacks)
    table_rank: ClassVar[int] = 1000
    #: the reference other methods are compared with in reports (linear probing)
    is_baseline: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, geometry: Geometry) -> None:
        super().__init__()
        self.config = config
        self.geometry = geometry
        self.bind("default", Injections(), AdapterRouting(active="default"), ForwardPlan(), num_classes=0)

    def bind(
        self,
        adapter_name: str,
        ledger: Injections,
        routing: AdapterRouting,
        plan: ForwardPlan,
        num_classes: int,
    ) -> None:
        """Make this method the adapter ``adapter_name`` of a model (``PromptModel`` calls it before ``attach``)."""
        #: the name of the adapter this method is, in its model
        self.adapter_name = adapter_name
        #: every hook, replaced module and loop change this adapter put into the backbone (a view of the
        #: model's ledger that names this adapter)
        self.injections = ledger.for_adapter(adapter_name)
        #: which adapter each sample of the current forward uses (shared with the model and its layers)
        self.routing = routing
        #: how forwards run (row skipping, prompts on/off), shared with the PromptModel
        self.plan = plan
        #: classes of this adapter's head
        self.num_classes = num_classes
        #: the backbone tensors this adapter tunes in place (the model fills it after ``attach``), and their
        #: values while another adapter is active (None while this one is)
        self.in_place: list[Any] = []
        self.stash: list[torch.Tensor] | None = None

    def on_own_rows(self, x: torch.Tensor, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``change`` applied to the samples of ``x`` this adapter serves in the current forward (all, some
        in a mixed batch, or none): what a hook of the method does to stay out of other adapters' samples."""
        groups = self.routing.groups((self.adapter_name,), x.shape[0])
        return on_rows(x, groups[0][1], change) if groups else x

    @classmethod
    def supports(cls, adapter: BackboneAdapter) -> bool:
        """Whether the method can attach to this backbone family; by default, when its kind is supported."""
        return adapter.kind in cls.supported_kinds

    def attach(self, backbone: nn.Module) -> None:
        """Inject layers or register hooks on the (frozen) backbone."""

    def backbone_parameters_to_tune(self, backbone: nn.Module) -> Iterator[nn.Parameter]:
        """Existing backbone parameters this method unfreezes (bias, norm, full, partial)."""
        return iter(())

    def build_head(self, classifier: nn.Module) -> nn.Module:
        """The adapter's head around the classifier the model made for it (an MLP head adds layers before)."""
        return classifier

    def classifier_of(self, head: nn.Module) -> nn.Module:
        """The final classifier layer inside the adapter's head (counted as 'head' in parameter summaries)."""
        return head

    def replace_classifier(self, head: nn.Module, classifier: nn.Module) -> nn.Module:
        """The adapter's head with ``classifier`` as its final layer (``PromptModel.reset_classifier``)."""
        return classifier

    def head_name(self, backbone: nn.Module) -> str:
        """Dotted name of the final classifier layer in artifact keys (``head``; ``head.2`` in an MLP head)."""
        return classifier_name(backbone)

    def modules_in_train_mode(self, backbone: nn.Module) -> Iterable[nn.Module]:
        """Backbone modules put in train mode while training; by default the tuner layers holding this adapter."""
        return (
            m for m in backbone.modules() if isinstance(m, TunerLayer) and self.adapter_name in m.adapter_names
        )

    @classmethod
    def expected_num_parameters(cls, config: MethodConfig, geometry: Geometry) -> int | None:
        """Closed-form count of the method's tuned parameters (head excluded), from the paper's formula.

        ``None`` where no closed form is defined for this geometry; the test matrix checks it otherwise.
        """
        return None

    @classmethod
    def prompted_depth(cls, config: MethodConfig, depth: int) -> int | None:
        """How many blocks carry the method's prompts or modules (reports plot scores against it).

        Default: the length of a ``layers`` option (every block when it is None); None without one.
        """
        if not any(f.name == "layers" for f in dataclasses.fields(config)):
            return None
        layers = config.layers
        return len(layers) if layers is not None else depth

    def tuned_from_block(self) -> int:
        """Index of the first ViT block whose computation depends on tuned parameters.

        Everything before it (``patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks[:l]``) is then
        frozen and deterministic (those modules stay in eval mode), so its output can be computed once per
        image and reused (``promptvit.cache``, ``TrainConfig.cache_prefix``). A method whose only change at
        block ``l`` is a change of its input in the block loop (an activation prompt, inserted tokens) may
        return ``l``: ``PromptModel.forward_from_block`` runs the loop from block ``l`` on.

        ``geometry.depth`` means that all blocks, the final norm and the pooling are frozen: the cache then
        holds the pre-logit features (``forward_head(..., pre_logits=True)``) and only the classifier runs
        (linear, mlp; also the only cut a CNN supports). 0, the default, means no caching is possible.
        """
        return 0

    def fits_head_to_convergence(self) -> bool:
        """Whether training is one fit of the head to convergence on fixed features instead of epochs
        (:mod:`promptvit.train.probe`); its training images then go through the evaluation transform, unaugmented,
        as in the CLIP and DINOv2 linear evaluations."""
        return False

    # Optional data-aware hooks (SPT, DA-VPT); the engine calls them, other methods keep the defaults.
    needs_data_init: ClassVar[bool] = False

    def initialize_from_data(
        self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, Any]:
        """Data-dependent initialisation before training, from ``(images, targets)`` batches of the training
        set (model in eval mode, no grad); returns numbers worth logging."""
        return {}

    def auxiliary_loss(self, model: nn.Module, targets: torch.Tensor) -> torch.Tensor | None:
        """Extra loss for the step whose forward just ran (``None`` for most methods)."""
        return None

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """Called by the engine after each epoch (numbered from 1); returns numbers worth logging."""
        return {}

    def peft_form(self, backbone: nn.Module) -> PeftForm | None:
        """The method as a Hugging Face peft adapter, or None where peft has no equivalent (the default)."""
        return None

    @classmethod
    def has_peft_form(cls) -> bool:
        """Whether the method's artifacts can be written as peft adapters (without building a model)."""
        return cls.peft_form is not Method.peft_form

    @classmethod
    def merges(cls) -> bool:
        """Whether ``merge`` folds the method's layers into the backbone's own weights."""
        return cls.merge is not Method.merge

    def merge(self) -> None:
        """Fold the method into the backbone weights where possible (LoRA)."""
        raise NotImplementedError(f"method '{self.name}' cannot be merged into the backbone")

    def unmerge(self) -> None:
        raise NotImplementedError(f"method '{self.name}' cannot be merged into the backbone")


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not getattr(cls, "name", None) or not getattr(cls, "config_class", None):
        raise TypeError(f"{cls.__name__} needs class attributes 'name' and 'config_class'")
    if cls.name in _REGISTRY:
        raise ValueError(f"method '{cls.name}' is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; available: {', '.join(sorted(_REGISTRY))}") from None


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def methods_in_table_order() -> list[str]:
    """Names of all registered methods in the row order of result tables (``table_rank``, then name)."""
    return sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].table_rank, name))


def baseline_method() -> str | None:
    """The registered method reports compare against (``is_baseline``), if any."""
    return next((name for name, cls in sorted(_REGISTRY.items()) if cls.is_baseline), None)


def make_config(method: str | MethodConfig, **options: Any) -> tuple[type[Method], MethodConfig]:
    """Resolve a method name plus options (or a config object) into its class and config."""
    if isinstance(method, MethodConfig):
        if options:
            method = dataclasses.replace(method, **options)
        for cls in _REGISTRY.values():
            if type(method) is cls.config_class:
                return cls, method
        raise ConfigError(f"{type(method).__name__} is not the config of any registered method")
    cls = get_method(method)
    return cls, cls.config_class.from_dict(options, method=cls.name)
