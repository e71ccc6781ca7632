"""The adapter every timm model falls back to: timm's public model contract, nothing family-specific.

It is registered for ``nn.Module``, the last class of every model's MRO, so :func:`adapter_for` picks it only
when no family adapter is registered for a more specific class. It reads what timm promises for every model:

* the classifier: ``pretrained_cfg["classifier"]`` (the module names timm resets for a new head; two for a
  distillation head), replaced through ``reset_classifier``;
* the pooled features: ``forward_head(forward_features(x), pre_logits=True)``; where the classifier is one
  linear (or 1x1 convolution) on them, or a pair of them averaged (timm's distillation heads), the logits
  are computed from them and the pre-logit features can be cached;
* the stages: the modules ``feature_info`` names (what ``features_only=True`` hooks), in order. Partial
  tuning of the last k stages tunes everything from the k-th last of them to the head (in the order the
  model registers its modules: a DenseNet's transitions and last dense block belong with its final norm),
  and an activation prompt goes in at a stage's input;
* the input module: the first module the images reach in ``forward_features`` (one probing forward).

Methods that change tokens, attention or MLPs need what only a family adapter knows (the token sequence,
the attention and MLP modules), so they are refused here with the name of the class that lacks one.
Models that do not follow timm's contract are refused, a torchvision model with a pointer to timm.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import timm.models
import torch
from torch import nn

from promptvit.backbones.base import (
    BackboneError,
    probe_forward_features,
    register_adapter,
    unwrap_base_layers,
)
from promptvit.backbones.cnn import CNNAdapter, classifier_input_width

#: the calls of timm's model contract this adapter relies on
TIMM_CONTRACT = ("get_classifier", "reset_classifier", "forward_features", "forward_head")


def _plain(value: Any) -> bool:
    """Whether an option can be written in an artifact (numbers, strings, and lists of them)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def timm_recorded_options(model: nn.Module) -> dict[str, Any]:
    """The ``timm.create_model`` options timm recorded for ``model`` (``timm.models.get_model_args``, newer timm
    releases), those an artifact can hold; nothing where timm keeps no record."""
    get_model_args = getattr(timm.models, "get_model_args", None)
    if get_model_args is None:
        return {}
    return {k: v for k, v in get_model_args(model).items() if _plain(v)}


def check_timm_contract(model: nn.Module) -> None:
    """Refuse, in one line, a model that is not a timm model (torchvision's are named as such)."""
    name = type(model).__name__
    module = type(model).__module__
    if module.split(".")[0] == "torchvision":
        raise BackboneError(
            f"unsupported backbone {name}: it is a torchvision model ({module}); promptvit wraps timm models, "
            "so build the timm one instead, e.g. timm.create_model('resnet50', pretrained=True)"
        )
    missing = [call for call in TIMM_CONTRACT if not callable(getattr(model, call, None))]
    if missing or not hasattr(model, "num_classes"):
        raise BackboneError(
            f"unsupported backbone {name}: promptvit wraps timm models (timm.create_model), and {name} has no "
            f"{', '.join(missing or ['num_classes'])}"
        )


@register_adapter(nn.Module)
class GenericAdapter(CNNAdapter):
    """Any timm model, through ``get_classifier``/``reset_classifier``, ``forward_head`` and ``feature_info``.

    Its kind is "cnn": stages of activations, no token path.
    """

    family = "Generic"
    tiny_builds: ClassVar[dict] = {
        # DenseNet (the classic chest X-ray backbone): BatchNorm-ReLU-conv layers, transitions, final norm
        "densenet": ("densenet121", dict(growth_rate=8, block_config=(1, 1, 1, 1)), 32),
        # RegNetX: grouped bottlenecks, stages s1..s4
        "regnet": (
            "regnetx_002",
            dict(depth=4, w0=8, wa=8, wm=1.3, group_size=8, stem_width=8),
            32,
        ),
    }

    def __init__(self, model: nn.Module) -> None:
        check_timm_contract(model)
        super().__init__(model)

    @property
    def kind_note(self) -> str:  # type: ignore[override]
        name = type(self.model).__name__
        return (
            f"{name} has no family adapter in promptvit, which sees it only through timm's generic contract (head, "
            f"pooled features, feature_info stages); this method needs a {name} family adapter that exposes its "
            "token sequence, attention and MLPs"
        )

    def observed_options(self) -> dict[str, Any]:
        """What timm recorded of the model's build: timm's contract shows no architecture options."""
        return {**timm_recorded_options(self.model), **super().observed_options()}

    # ------------------------------------------------------------------ classifier

    def _classifier_names(self) -> list[str]:
        """The classifiers' dotted names: those ``pretrained_cfg["classifier"]`` lists where it lists several
        (a distillation head, a head per branch), else the one ``get_classifier`` returns."""
        names = (getattr(self.model, "pretrained_cfg", None) or {}).get("classifier")
        modules = dict(self.model.named_modules())
        if isinstance(names, (tuple, list)) and len(names) > 1 and all(n in modules for n in names):
            return list(names)
        return [self.classifier_name()]

    def classifier_modules(self) -> list[nn.Module]:
        return [self.model.get_submodule(name) for name in self._classifier_names()]

    def classifier_slots(self) -> list[tuple[nn.Module, str]]:
        slots = []
        for name in self._classifier_names():
            parent, _, child = name.rpartition(".")
            slots.append((self.model.get_submodule(parent) if parent else self.model, child))
        return slots

    def head_reads_pre_logits(self) -> bool:
        """One linear (or 1x1 conv) head on the pre-logit features, or several averaged (timm's distillation
        heads, which ``get_classifier`` returns together); any other head (branch heads, a norm or weights
        before the linear) computes from more than those features.

        ``get_classifier`` returns those modules, or one of timm's head modules (pooling, then the linear) whose
        forward stops at the pre-logit features when asked (``pre_logits=True``).
        """
        heads = self.classifier_modules()
        own = self.model.get_classifier()
        own = list(own) if isinstance(own, (tuple, list)) else [own]
        head_module = len(own) == 1 and "pre_logits" in inspect.signature(own[0].forward).parameters
        if [id(m) for m in heads] != [id(m) for m in own] and not (
            head_module and all(any(m is h for m in own[0].modules()) for h in heads)
        ):
            return False
        width = self.pre_logits_width()
        return all(classifier_input_width(unwrap_base_layers(head)) == width for head in heads)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        if not self.head_reads_pre_logits():
            raise BackboneError(
                f"the head of {type(self.model).__name__} does not compute its logits from the pre-logit features "
                "alone, so they cannot be classified (or cached) apart from the model"
            )
        logits = []
        for head in self.classifier_modules():
            if isinstance(unwrap_base_layers(head), nn.Conv2d):  # an adapter's head in its slot is one too
                logits.append(head(features[:, :, None, None]).flatten(1))
            else:
                logits.append(head(features))
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)

    # ------------------------------------------------------------------ geometry, stages and input

    def input_size(self) -> tuple[int, int]:
        """(H, W) the model takes: its patch embedding's (or its own) ``img_size`` where it has one (timm
        transformers are built for one size, which ``img_size=`` changes), else its pretrained config's."""
        size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        size = size if size is not None else getattr(self.model, "img_size", None)  # MaxxVit, newer timm
        if size is None:
            return super().input_size()
        size = (size, size) if isinstance(size, int) else tuple(size)
        return int(size[0]), int(size[1])

    @property
    def stages(self) -> list[nn.Module]:
        """The modules of ``feature_info`` (each once, in order), outside the classifier."""
        info = getattr(self.model, "feature_info", None)
        if not isinstance(info, (list, tuple)):
            return []
        modules = dict(self.model.named_modules())
        head = {id(m) for c in self.classifier_modules() for m in c.modules()}
        stages: list[nn.Module] = []
        for entry in info:
            module = modules.get(entry.get("module") or "") if isinstance(entry, dict) else None
            if module is not None and module is not self.model and id(module) not in head and module not in stages:
                stages.append(module)
        return stages

    def last_stages(self, count: int) -> list[nn.Module]:
        """Every module registered from the ``count``-th last stage on, except the classifier.

        The largest subtrees whose parameters all lie in that range, so a stage's dropout and norms switch
        to train mode with it. ``feature_info`` may skip modules between its stages (a DenseNet's
        transitions, the dense block before its final norm): they belong with the stage after them.
        """
        stages = self.stages
        if not 0 < count <= len(stages):
            raise BackboneError(f"{type(self.model).__name__} has {len(stages)} stages, not {count}")
        order = {id(p): i for i, p in enumerate(self.model.parameters())}
        named = [module for _, module in self.model.named_modules()]  # parents before their children
        position = next(i for i, module in enumerate(named) if module is stages[-count])
        # the stage's first parameter, or (a parameter-free stage: an activation, a pooling) the next one
        start = next(
            (order[id(p)] for module in named[position:] for p in module.parameters(recurse=False)), len(order)
        )
        head = {id(p) for c in self.classifier_modules() for p in c.parameters()}
        chosen: list[nn.Module] = []
        inside: set[int] = set()
        for module in named:
            if id(module) in inside:
                continue
            own = list(module.parameters())
            if own and all(order[id(p)] >= start and id(p) not in head for p in own):
                chosen.append(module)
                inside.update(id(m) for m in module.modules())
        return chosen

    @torch.no_grad()
    def input_module(self) -> nn.Module:
        """The first module ``forward_features`` hands the images to (one probing forward of zeros).

        It must run once per forward, on the images alone: a module that also runs on other inputs is not the
        model's input.
        """
        reference = next(self.model.parameters())
        height, width = self.geometry().img_size
        images = torch.zeros(1, 3, height, width, device=reference.device, dtype=reference.dtype)
        calls: dict[int, int] = {}
        on_images: list[nn.Module] = []

        def record(module: nn.Module, args: tuple) -> None:
            calls[id(module)] = calls.get(id(module), 0) + 1
            if args and args[0] is images and not on_images:
                on_images.append(module)

        probe_forward_features(self.model, images, [m for m in self.model.modules() if m is not self.model], record)
        if not on_images:
            raise BackboneError(
                f"{type(self.model).__name__} transforms the images before any of its modules sees them, so no "
                "module is its input"
            )
        if calls[id(on_images[0])] != 1:
            raise BackboneError(
                f"the first module of {type(self.model).__name__} that sees the images runs "
                f"{calls[id(on_images[0])]} times per forward, so it is not the model's input alone"
            )
        return on_images[0]
