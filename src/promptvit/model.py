"""``PromptModel``: a timm backbone with named adapters (tuning methods) attached, and ``wrap`` to make one."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from promptvit.artifact_format import (
    CONFIG_FILE,
    geometry_differences,
    load_tuned_state,
    read_artifact,
    read_artifact_config,
    read_artifact_weights,
    resolve_artifact_dir,
    save_artifact,
)
from promptvit.backbones import (
    BackboneError,
    Geometry,
    adapter_for,
    backbone_source,
    base_model_call,
    body_parameters,
    find_weights_file,
    geometry_of,
    origin_of,
    rebuild_backbone,
    rebuild_problem,
    weights_fingerprint,
)
from promptvit.errors import ArtifactError, listed
from promptvit.hub import local_folder
from promptvit.io import atomic_write
from promptvit.layers.base import LOOP_KINDS, AdapterRouting, ForwardPlan, Injections, PerAdapter, TunerLayer
from promptvit.layers.block_plan import BlockPlan, block_plan, changed_images
from promptvit.layers.heads import AdapterHeads
from promptvit.methods.base import ConfigError, Method, MethodConfig, get_method, make_config

#: owner of the ledger entries the model itself makes (the heads in the classifier slots)
_MODEL = ""
#: an adapter name: a Python identifier (it becomes a module name inside tuner layers)
_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclasses.dataclass(eq=False)
class _TensorRef:
    """A backbone parameter or buffer named by its module and attribute (buffers are replaced by ``.to()``)."""

    module: nn.Module
    name: str

    def get(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    def same(self, other: _TensorRef) -> bool:
        return self.module is other.module and self.name == other.name


@dataclasses.dataclass
class _Original:
    """What the backbone was before ``wrap``, to give it back unchanged (``disable_adapter``, ``unload``)."""

    heads: list[nn.Module]  # the classifier modules, one per classifier slot
    num_classes: int
    requires_grad: list[tuple[nn.Parameter, bool]]
    #: ids of the backbone's own parameters; its own modules, heads aside (what adapters may tune in place)
    parameters: set[int]
    modules: list[nn.Module]
    #: values, at wrap time and on the CPU, of every backbone tensor an adapter tunes in place
    values: list[tuple[_TensorRef, torch.Tensor]] = dataclasses.field(default_factory=list)

    def value(self, ref: _TensorRef) -> torch.Tensor:
        return next(value for known, value in self.values if known.same(ref))

    def keep(self, ref: _TensorRef) -> None:
        """Remember ``ref``'s value now (before any adapter changed it) if it is not remembered yet."""
        if not any(known.same(ref) for known, _ in self.values):
            tensor = ref.get().detach()
            self.values.append((ref, tensor if tensor.is_meta else tensor.to("cpu", copy=True)))

    def __deepcopy__(self, memo: dict[int, Any]) -> _Original:
        # The saved values are never written to, so copies of a model (best-epoch snapshots) share them.
        return _Original(
            heads=copy.deepcopy(self.heads, memo),
            num_classes=self.num_classes,
            requires_grad=[(copy.deepcopy(p, memo), flag) for p, flag in self.requires_grad],
            parameters={id(copy.deepcopy(p, memo)) for p, _ in self.requires_grad},
            modules=copy.deepcopy(self.modules, memo),
            values=[(copy.deepcopy(ref, memo), value) for ref, value in self.values],
        )


def _artifact_key(path: str) -> str:
    """A state-dict key without ``base_layer`` levels: the same whatever tuner layers wrap the module."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


class PromptModel(nn.Module):
    """A frozen timm backbone plus named adapters (tuning methods), each with its own head.

    peft's vocabulary: the first adapter is ``"default"``; ``add_adapter``, ``load_adapter``,
    ``set_adapter``, ``delete_adapter``, ``active_adapter``, ``adapters`` (name -> method);
    ``disable_adapter()`` and ``unload()`` give the backbone's own forward back. ``model.method`` is the active
    adapter's method, so code written for one method keeps working. Exactly the active adapter's tensors and
    head have ``requires_grad``. The timm model contract (``forward_features``, ``forward_head``,
    ``get_classifier``) is passed through, so timm training code keeps working.

    ``forward(images)`` runs the active adapter; ``forward(images, adapter_names=[...])`` (one name per
    sample, inference only) runs each sample through its own adapter: samples whose adapters can share a
    forward do (tuner layers apply each adapter to its own rows), the others run in groups
    (:meth:`forward_adapters`).

    The model owns the block loop of token models: ``forward`` = images (pixel prompts) -> ``embed`` ->
    ``forward_blocks(x, plan)`` -> prompts stripped -> final norm -> head, where the
    :class:`~promptvit.layers.block_plan.BlockPlan` carries the adapters' loop changes (prompt tokens,
    block-input prompts) and says which rows each block computes. ``model.backbone`` called on its own runs
    timm's forward: injected layers and hooks, but no loop changes.

    Class-token readout: when the head reads only the class token (timm ViT, ``global_pool='token'``), the
    logits paths (``forward``, ``forward_from_block``) run the last block for that one row; every token still
    serves as key and value (:mod:`promptvit.layers.selected_tokens`). Same logits up to float rounding (about
    1e-7 in float32), a sixth of the last block's cost; the final norm then sees that row only. It stands aside
    while an adapter hooks into the last block and under gradient checkpointing; ``all_token_outputs()`` (the
    analysis recorders enter it, and so must code that hooks into blocks itself: a block that computes some
    rows only is not called as a module) or ``plan.using(class_token_readout=False)`` turn it off.
    ``forward_features`` always returns every token.
    """

    def __init__(
        self, backbone: nn.Module, source: dict[str, Any], base_fingerprint: str, original: _Original
    ) -> None:
        super().__init__()
        self.backbone = backbone
        #: adapter name -> its method (config, geometry, own tensors); artifact keys call it ``method``
        self.adapters = PerAdapter(artifact_name="method")
        self.adapter = adapter_for(backbone)
        self._geometry = self.adapter.geometry()
        #: what ``wrap`` changed outside the adapters' ledger entries (heads, tuned weights, requires_grad)
        self._original = original
        #: every change of every adapter (and the heads in the classifier slots), with its owners
        self._ledger = Injections()
        #: which adapter each sample of the current forward uses (shared with every tuner layer)
        self.routing = AdapterRouting()
        #: how forwards run (class-token readout, prompt-output skipping), shared with the adapters
        self.plan = ForwardPlan()
        #: how to rebuild the backbone (timm name, pretrained or local weights file, build options)
        self.source = source
        #: hash of the backbone weights before tuning; an artifact only fits a backbone with the same hash
        self.base_fingerprint = base_fingerprint
        self._heads = [
            self._ledger.for_adapter(_MODEL).replace(
                parent, name, AdapterHeads(getattr(parent, name), self.routing)
            )
            for parent, name in self.adapter.classifier_slots()
        ]

    # ------------------------------------------------------------------ adapters

    @property
    def active_adapter(self) -> str:
        """The adapter ``forward`` runs (and training tunes)."""
        return self.routing.active

    @property
    def method(self) -> Method:
        """The active adapter's method."""
        return self.adapters[self.active_adapter]

    @property
    def geometry(self) -> Geometry:
        return self._geometry

    @property
    def config(self) -> MethodConfig:
        return self.method.config

    @property
    def num_classes(self) -> int:
        return self.method.num_classes

    @property
    def head_name(self) -> str:
        """The active adapter's classifier in artifact keys, below ``backbone.`` (``head``, ``head.2``...)."""
        return self.method.head_name(self.backbone)

    def add_adapter(
        self, adapter_name: str, method: str | MethodConfig, *, num_classes: int | None = None, **options: Any
    ) -> Method:
        """Attach another adapter (not made active: see :meth:`set_adapter`); returns its method.

        ``method`` is a registered method name or a config object, ``options`` the method's options;
        ``num_classes`` sizes the adapter's new head (``None``: a copy of the backbone's own head).
        """
        if not isinstance(adapter_name, str) or not _ADAPTER_NAME.match(adapter_name):
            raise ConfigError(
                f"adapter name {adapter_name!r} must be a Python identifier, e.g. 'default' or 'task_2'"
            )
        if adapter_name in self.adapters:
            raise ConfigError(
                f"there is already an adapter named '{adapter_name}'; delete_adapter() it first"
            )
        if not self._ledger.active:
            raise RuntimeError("cannot add an adapter inside disable_adapter()")
        method_cls, config = make_config(method, **options)
        family = self.adapter
        if not method_cls.supports(family):
            geometry = self.geometry
            raise ConfigError(
                f"method '{method_cls.name}' supports {', '.join(method_cls.supported_kinds)} backbones, "
                f"not {geometry.architecture} ({geometry.kind})"
                + (f": {family.kind_note}" if family.kind_note else "")
            )
        if num_classes is not None and num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        classes = self._original.num_classes if num_classes is None else num_classes
        if classes < 1:
            raise ConfigError("the model has no classifier (num_classes=0); pass num_classes to wrap()")
        heads = self._new_heads(num_classes)  # before the method, as timm's reset_classifier always was
        tuner = method_cls(config, self.geometry)
        tuner.bind(adapter_name, self._ledger, self.routing, self.plan, num_classes=classes)
        try:
            tuner.attach(self.backbone)
            for slot, (wrapper, head) in enumerate(zip(self._heads, heads, strict=True)):
                wrapper.heads[adapter_name] = (
                    tuner.build_head(head) if slot == 0 else head
                )  # MLP: the main one
        except Exception:
            self._forget(adapter_name)
            raise
        tuner.in_place = self._in_place_tensors(tuner)
        for ref in tuner.in_place:
            self._original.keep(ref)
        tuner.stash = [self._original.value(ref).to(ref.get().device, copy=True) for ref in tuner.in_place]
        self.adapters[adapter_name] = tuner
        self._set_requires_grad()
        return tuner

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one ``forward`` runs and training tunes (its tensors get ``requires_grad``).

        A merged adapter is unmerged first. Backbone weights the adapters tune in place are swapped.
        """
        self._check_known(adapter_name)
        previous = self.routing.active
        if previous is not None and previous != adapter_name:
            if getattr(self.method, "merged", False):
                self.method.unmerge()
            self._swap_in_place(previous, None)
        if previous != adapter_name:
            self._swap_in_place(None, adapter_name)
        self.routing.active = adapter_name
        self.backbone.num_classes = self.method.num_classes
        self._set_requires_grad()
        self.train(self.training)

    def delete_adapter(self, adapter_name: str) -> None:
        """Take an adapter out: its tensors, its head and every change only it needed.

        Deleting the active adapter makes the first remaining one active; the last adapter cannot be deleted
        (``unload()`` gives the backbone back).
        """
        self._check_known(adapter_name)
        if len(self.adapters) == 1:
            raise ConfigError(
                f"'{adapter_name}' is the only adapter; unload() gives the backbone back instead"
            )
        if not self._ledger.active:
            raise RuntimeError("cannot delete an adapter inside disable_adapter()")
        if adapter_name == self.active_adapter:
            self.set_adapter(next(name for name in self.adapters if name != adapter_name))
        self._forget(adapter_name)
        del self.adapters[adapter_name]
        self._set_requires_grad()

    def _forget(self, adapter_name: str) -> None:
        for module in self.backbone.modules():
            if isinstance(module, TunerLayer):
                module.delete_adapter(adapter_name)
        self._ledger.release(adapter_name)

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.adapters:
            known = ", ".join(f"'{name}'" for name in self.adapters)
            raise ConfigError(f"no adapter named '{adapter_name}'; this model has {known}")

    def _new_heads(self, num_classes: int | None) -> list[nn.Module]:
        """Heads for a new adapter, one per classifier slot: copies of the backbone's own, or the ones timm's
        ``reset_classifier(num_classes)`` builds (the slots keep their ``AdapterHeads``)."""
        if num_classes is None:
            return [copy.deepcopy(head) for head in self._original.heads]
        return self.adapter.new_classifiers(num_classes)

    def _in_place_tensors(self, method: Method) -> list[_TensorRef]:
        """The backbone's own parameters the method tunes in place (original heads excluded), and the
        buffers of the backbone modules it trains (BatchNorm statistics)."""
        tuned = {id(p) for p in method.backbone_parameters_to_tune(self.backbone)}
        original_heads = {id(p) for head in self._original.heads for p in head.parameters()}
        refs = [
            _TensorRef(module, name)
            for module in self.backbone.modules()
            for name, p in module.named_parameters(recurse=False)
            if id(p) in tuned and id(p) in self._original.parameters and id(p) not in original_heads
        ]
        trained = [self.backbone] if method.trains_backbone else method.modules_in_train_mode(self.backbone)
        own = {id(m) for m in self._original.modules}
        seen = set()
        for module in trained:
            for owner in module.modules():
                if id(owner) not in own or id(owner) in seen:  # adapters' own modules, or seen
                    continue
                seen.add(id(owner))
                persistent = owner.state_dict(keep_vars=True)  # not index tables rebuilt at init (Swin)
                refs += [
                    _TensorRef(owner, name)
                    for name, _ in owner.named_buffers(recurse=False)
                    if name in persistent
                ]
        return refs

    @torch.no_grad()
    def _swap_in_place(self, leaving: str | None, entering: str | None) -> None:
        """``leaving``'s in-place values go to its stash (the backbone's own come back), then ``entering``'s
        come out of its stash into the backbone."""
        if leaving is not None:
            method = self.adapters[leaving]
            method.stash = [ref.get().detach().clone() for ref in method.in_place]
            for ref in method.in_place:
                ref.get().copy_(self._original.value(ref))
        if entering is not None:
            method = self.adapters[entering]
            for ref, value in zip(method.in_place, method.stash, strict=True):
                ref.get().copy_(value)
            method.stash = None

    @contextlib.contextmanager
    def _in_place_values_of(self, adapter_name: str | None) -> Iterator[None]:
        """Within the block the backbone holds ``adapter_name``'s in-place values (None: its own)."""
        active = self.active_adapter
        if adapter_name == active:
            yield
            return
        self._swap_in_place(active, None)
        self._swap_in_place(None, adapter_name)
        try:
            yield
        finally:
            self._swap_in_place(adapter_name, None)
            self._swap_in_place(None, active)

    def _set_requires_grad(self) -> None:
        """The active adapter's tensors (own, in place, head) are tuned; everything else is frozen."""
        active = self.active_adapter
        for name in self.adapters:
            for _, parameter in self._own_tensors(name, parameters=True):
                parameter.requires_grad_(name == active)
        for method in self.adapters.values():
            for ref in method.in_place:
                if isinstance(ref.get(), nn.Parameter):
                    ref.get().requires_grad_(False)
        if active is not None and active in self.adapters:
            for ref in self.method.in_place:
                if isinstance(ref.get(), nn.Parameter):
                    ref.get().requires_grad_(True)

    # ------------------------------------------------------------------ tensors of one adapter

    def _own_tensors(self, adapter_name: str, *, parameters: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """The adapter's tensors in ``PerAdapter`` containers (its method, tuner-layer entries, heads), under
        their artifact keys: the container and the adapter name vanish (or become the container's
        ``artifact_name``), and so do ``base_layer`` levels."""
        for path, container in self.named_modules():
            if not isinstance(container, PerAdapter) or adapter_name not in container:
                continue
            parent = path.rpartition(".")[0]
            prefix = ".".join(filter(None, [parent, container.artifact_name]))
            module = container[adapter_name]
            if parameters:
                items = module.named_parameters()
            else:
                persistent = module.state_dict(keep_vars=True)
                items = ((n, b) for n, b in module.named_buffers() if n in persistent)
            for name, tensor in items:
                yield _artifact_key(f"{prefix}.{name}" if prefix else name), tensor

    def _in_place_items(self, adapter_name: str) -> Iterator[tuple[str, _TensorRef, torch.Tensor]]:
        """(artifact key, reference, current value) of the adapter's in-place tensors (the stash while it is
        not active)."""
        method = self.adapters[adapter_name]
        paths = {id(m): n for n, m in self.named_modules()}
        values = method.stash if method.stash is not None else [ref.get() for ref in method.in_place]
        for ref, value in zip(method.in_place, values, strict=True):
            yield _artifact_key(f"{paths[id(ref.module)]}.{ref.name}"), ref, value

    def tuned_named_parameters(self, adapter_name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """The adapter's tuned parameters (default: the active one's), under their artifact keys."""
        name = self.active_adapter if adapter_name is None else adapter_name
        self._check_known(name)
        own = {id(p): key for key, p in self._own_tensors(name, parameters=True)}
        in_place = (
            {id(ref.get()): key for key, ref, _ in self._in_place_items(name)}
            if name == self.active_adapter
            else {}
        )
        for _, parameter in self.named_parameters():
            key = own.get(id(parameter), in_place.get(id(parameter)))
            if key is not None and isinstance(parameter, nn.Parameter):
                yield key, parameter

    def tuned_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Exactly what an artifact of the adapter (default: the active one) stores, sharing storage with it:
        its own tensors (method, tuner-layer entries, head) and the backbone tensors it tunes in place
        (including BatchNorm statistics of modules trained in train mode)."""
        name = self.active_adapter if adapter_name is None else adapter_name
        self._check_known(name)
        state = {key: t.detach() for key, t in self._own_tensors(name, parameters=True)}
        state.update({key: t.detach() for key, t in self._own_tensors(name, parameters=False)})
        state.update({key: value.detach() for key, _, value in self._in_place_items(name)})
        return state

    def _adapter_heads(self, adapter_name: str) -> list[nn.Module]:
        return [wrapper.heads[adapter_name] for wrapper in self._heads]

    def get_classifier(self) -> nn.Module:
        return self.method.classifier_of(self.adapter_head())

    def adapter_head(self, adapter_name: str | None = None) -> nn.Module:
        """The adapter's head (default: the active one's) as its method built it: an MLP head whole."""
        return self._adapter_heads(self.active_adapter if adapter_name is None else adapter_name)[0]

    def extra_heads(self) -> list[nn.Module]:
        """The active adapter's classifiers besides the main one (a distilled ViT's distillation head)."""
        return self._adapter_heads(self.active_adapter)[1:]

    def parameter_summary(self, adapter_name: str | None = None) -> dict[str, int]:
        """Tuned parameter counts of the adapter (default: the active one) by group (head, method), plus tuned
        and total (the backbone's own parameters and the adapter's)."""
        name = self.active_adapter if adapter_name is None else adapter_name
        method = self.adapters[name]
        heads = self._adapter_heads(name)
        head = sum(p.numel() for m in [method.classifier_of(heads[0]), *heads[1:]] for p in m.parameters())
        own = sum(t.numel() for _, t in self._own_tensors(name, parameters=True))
        in_place = sum(
            value.numel()
            for _, ref, value in self._in_place_items(name)
            if isinstance(ref.get(), nn.Parameter)
        )
        original_heads = sum(p.numel() for h in self._original.heads for p in h.parameters())
        body = sum(p.numel() for p, _ in self._original.requires_grad) - original_heads
        return {"method": own + in_place - head, "head": head, "tuned": own + in_place, "total": body + own}

    def print_trainable_parameters(self) -> str:
        """Print and return a one-line summary in the style of peft."""
        s = self.parameter_summary()
        line = (
            f"method {self.method.name}: tuned params {s['tuned']:,} (method {s['method']:,} + head {s['head']:,})"
            f" || all params {s['total']:,} || tuned% {100 * s['tuned'] / s['total']:.4f}"
        )
        print(line)
        return line

    # ------------------------------------------------------------------ forward

    def _check_size(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):  # e.g. timm's NaFlex batch of patches, masks and coordinates
            raise ValueError(
                f"the model takes a batch of images as one (batch, channels, height, width) tensor, not a "
                f"{type(images).__name__}; pass the images themselves"
            )
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

    def forward(self, images: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        """Logits of the active adapter, or with ``adapter_names`` (one per sample) of each sample's adapter
        (adapters of one batch must then have the same number of classes; :meth:`forward_adapters` has no
        such limit)."""
        if adapter_names is not None:
            return self._stacked_logits(images, adapter_names)
        self._check_size(images)
        return self._logits(images)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        with self._logits_pass():
            images = self._changed_images(images)
            if not self.adapter.has_block_loop:
                return self.backbone(images)
            tokens = self._final_tokens(self.adapter.embed(images), image_size=images.shape[-2:])
            return self.backbone.forward_head(tokens)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` with the active adapter's changes: every token after the final norm."""
        images = self._changed_images(images)
        if not self.adapter.has_block_loop:
            return self.backbone.forward_features(images)
        return self._final_tokens(self.adapter.embed(images), image_size=images.shape[-2:])

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.backbone.forward_head(features, pre_logits=pre_logits)

    def _head_input(self, images: torch.Tensor) -> torch.Tensor:
        """What the heads receive (``forward_head(..., pre_logits=True)``), in a logits pass."""
        images = self._changed_images(images)
        with self._logits_pass():
            if not self.adapter.has_block_loop:
                return self.adapter.pre_logits(images)
            tokens = self._final_tokens(self.adapter.embed(images), image_size=images.shape[-2:])
            return self.adapter.head_input(tokens)

    def forward_adapters(self, images: torch.Tensor, adapter_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each sample through its own adapter (``adapter_names[i]`` for ``images[i]``): adapter name -> the
        logits of its samples, in batch order. Inference only (the model must be in eval mode).

        Samples whose adapters can share one forward do (tuner layers, pixel and block-input prompts and
        prompt tokens apply each adapter to its own samples): every adapter that inserts no prompt tokens
        shares one forward, adapters with the same prompt-token layout share another. An adapter that tunes
        backbone weights in place runs alone, with its weights swapped in. Then each adapter's head.
        """
        names = [str(name) for name in adapter_names]
        self._check_mixed(images, names)
        self._check_size(images)
        group_of = {name: self._forward_group(name) for name in dict.fromkeys(names)}
        groups: dict[tuple, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(group_of[name], []).append(row)
        rows_of: dict[str, list[int]] = {name: [] for name in group_of}
        logits_of: dict[str, list[torch.Tensor]] = {name: [] for name in group_of}
        for key, rows in groups.items():
            members = [names[row] for row in rows]
            unique = list(dict.fromkeys(members))
            index = torch.tensor(rows, device=images.device)
            routing = (
                self.routing.using(unique[0])
                if len(unique) == 1
                else self.routing.using(None, members, device=images.device)
            )
            in_place = key[1] if key[0] in ("alone", "whole forward") else None
            if key[0] == "whole forward":  # one adapter: its head reads more than the pre-logit features
                with self._in_place_values_of(in_place), routing:
                    logits_of[unique[0]].append(self._logits(images[index]))
                rows_of[unique[0]] += rows
                continue
            with self._in_place_values_of(in_place), routing:
                features = self._head_input(images[index])
            for name in unique:
                positions = [i for i, member in enumerate(members) if member == name]
                with self.routing.using(name):
                    logits = self.adapter.classify(features[positions] if len(unique) > 1 else features)
                rows_of[name] += [rows[i] for i in positions]
                logits_of[name].append(logits)
        result = {}
        for name in group_of:
            logits = torch.cat(logits_of[name]) if len(logits_of[name]) > 1 else logits_of[name][0]
            order = sorted(range(len(rows_of[name])), key=rows_of[name].__getitem__)
            result[name] = logits[order] if order != list(range(len(order))) else logits
        return result

    def _stacked_logits(self, images: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        names = [str(name) for name in adapter_names]
        per_adapter = self.forward_adapters(images, names)
        widths = {name: logits.shape[-1] for name, logits in per_adapter.items()}
        if len(set(widths.values())) > 1:
            raise ConfigError(
                f"the adapters of this batch have different numbers of classes ({widths}); "
                "use model.forward_adapters(images, adapter_names), which gives each adapter's logits"
            )
        first = next(iter(per_adapter.values()))
        logits = first.new_empty(len(names), first.shape[-1])
        for name, values in per_adapter.items():
            logits[[row for row, member in enumerate(names) if member == name]] = values
        return logits

    def _check_mixed(self, images: torch.Tensor, names: list[str]) -> None:
        if len(names) != images.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {images.shape[0]} images")
        for name in dict.fromkeys(names):
            self._check_known(name)
        if self.training:
            raise ValueError("adapter_names is for inference: call model.eval() first")
        if not self._ledger.active:
            raise ValueError("adapter_names cannot be used inside disable_adapter()")
        if getattr(self.method, "merged", False):
            raise ValueError("cannot pass adapter_names while the active adapter is merged; unmerge() first")
        if getattr(self.backbone, "grad_checkpointing", False) and torch.is_grad_enabled():
            raise ValueError("adapter_names with gradient checkpointing needs torch.no_grad()")

    def runs_alone(self, adapter_name: str) -> bool:
        """Whether the adapter's samples run in a forward of their own in a mixed batch (it tunes backbone
        weights in place, which must be swapped in, or the heads read more than the pre-logit features)."""
        return self._forward_group(adapter_name)[0] in ("alone", "whole forward")

    def _head_only(self, adapter_name: str) -> bool:
        """Whether the adapter changes nothing but the head (no layer, hook or loop change, no weights), on
        the pre-logit features the heads share."""
        method = self.adapters[adapter_name]
        return (
            not method.in_place
            and next(iter(method.injections), None) is None
            and self.adapter.head_reads_pre_logits()
        )

    def forward_every_adapter(
        self, images: torch.Tensor, adapter_names: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Every image through every adapter (default: all of them): adapter name -> (batch, classes) logits.

        Adapters that change only the head share one forward of the images; the others run as the mixed
        batch of the images repeated once per adapter (:meth:`forward_adapters`). Inference only.
        """
        names = list(self.adapters) if adapter_names is None else [str(n) for n in adapter_names]
        head_only = [name for name in names if self._head_only(name)]
        others = [name for name in names if name not in head_only]
        result: dict[str, torch.Tensor] = {}
        if head_only:
            self._check_mixed(images, [head_only[0]] * images.shape[0])
            with self._in_place_values_of(None), self.routing.using(None):
                features = self._head_input(images)
            for name in head_only:
                with self.routing.using(name):
                    result[name] = self.adapter.classify(features)
        if others:
            repeated = images.repeat(len(others), *([1] * (images.dim() - 1)))
            result.update(
                self.forward_adapters(repeated, [name for name in others for _ in range(images.shape[0])])
            )
        return {name: result[name] for name in names}

    def _forward_group(self, adapter_name: str) -> tuple:
        """Which forward a sample of this adapter can share in a mixed batch (declared by what its method
        records, never by its name): alone when it tunes backbone weights in place, else with every adapter
        of the same prompt-token layout (or of none). Where the head reads more than the pre-logit features
        (heads per branch), no two adapters share features: each runs the whole forward on its samples."""
        method = self.adapters[adapter_name]
        if not self.adapter.head_reads_pre_logits():
            return ("whole forward", adapter_name)
        if method.in_place:
            return ("alone", adapter_name)
        schedules = method.injections.entries("tokens")
        return ("tokens", schedules[0].target.layout) if schedules else ("shared",)

    def reset_classifier(self, num_classes: int) -> None:
        """A new, trainable head with ``num_classes`` outputs for the active adapter (timm's
        ``reset_classifier``); a head the method built (an MLP head) keeps its hidden layers and gets a new
        last layer."""
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        active, method = self.active_adapter, self.method
        for slot, (wrapper, made) in enumerate(zip(self._heads, self._new_heads(num_classes), strict=True)):
            old = method.classifier_of(wrapper.heads[active]) if slot == 0 else wrapper.heads[active]
            reference = next(old.parameters(), None)
            if reference is not None:
                made = made.to(device=reference.device, dtype=reference.dtype)
            if slot == 0:
                wrapper.heads[active] = method.replace_classifier(wrapper.heads[active], made)
            else:
                wrapper.heads[active] = made
        method.num_classes = self.backbone.num_classes = num_classes
        self._set_requires_grad()
        self.train(self.training)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The backbone's timm ``pretrained_cfg`` (preprocessing, licence...), as on a timm model."""
        return self.backbone.pretrained_cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

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
        if cut == depth and not self.adapter.head_reads_pre_logits():
            return 0  # the logits need more than the pre-logit features (generic adapter: branch heads...)
        random = {id(m) for m in _stochastic_depth(self.backbone)}
        if self.geometry.kind != "vit":
            return cut if cut == depth and not random else 0
        # Stochastic depth trains with the model (see ``train``): the prefix ends before its first such block.
        blocks = self.adapter.blocks
        random_blocks = [i for i, b in enumerate(blocks) if any(id(m) in random for m in b.modules())]
        return min([cut, *random_blocks])

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

        ViT, ``block < depth``: ``embed -> blocks[:block]`` through the block loop. ``block == depth``: the
        input of the classifier (``forward_head(forward_features(x), pre_logits=True)``).
        ``forward_from_block(forward_prefix(x, l), l) == forward(x)``.
        """
        self._check_cut(block)
        if block == self.geometry.depth:
            return self._head_input(images)
        if self.geometry.kind != "vit":
            return images
        images = self._changed_images(images)
        x = self.adapter.embed(images)
        return self.adapter.forward_blocks(x, self._block_plan(), end=block, image_size=images.shape[-2:])

    def forward_from_block(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Logits from the output of :meth:`forward_prefix` at the same ``block``.

        Runs the block loop from ``blocks[block]`` on (with the adapter's changes there, e.g. token and
        activation prompts), strips the prompts, then ``norm`` and ``forward_head``. With ``block == depth``
        only the classifier runs. Honours timm's gradient checkpointing (``backbone.set_grad_checkpointing``).
        """
        self._check_cut(block)
        if block == self.geometry.depth:
            return self.adapter.classify(x)
        if self.geometry.kind != "vit":  # block 0: the images
            return self(x)
        with self._logits_pass():
            return self.backbone.forward_head(self._final_tokens(x, start=block))

    # ------------------------------------------------------------------ the block loop

    def _changed_images(self, images: torch.Tensor) -> torch.Tensor:
        return changed_images(self._ledger, self.routing, images)

    def _final_tokens(
        self, x: torch.Tensor, start: int = 0, image_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Run the block loop from ``blocks[start]`` on, strip the prompt tokens, apply the final norm."""
        plan = self._block_plan()
        x = self.adapter.forward_blocks(x, plan, start=start, image_size=image_size)
        return self.adapter.final_norm(plan.after_blocks(x, len(self.adapter.blocks) - 1))

    def _block_plan(self) -> BlockPlan:
        """The plan of one forward: the adapters' loop changes and the rows each block computes."""
        readout = len(self.adapter.blocks) - 1 if self._reads_class_token_only() else None
        return block_plan(self.plan, self._ledger, self.routing, readout)

    def all_token_outputs(self) -> contextlib.AbstractContextManager[ForwardPlan]:
        """Within the block every block computes every token's output: no class-token readout, and token-prompt
        methods keep their prompt outputs. Same logits, more work; for tools that read hidden tokens."""
        return self.plan.using(class_token_readout=False, skip_prompt_outputs=False)

    def _logits_pass(self) -> contextlib.AbstractContextManager[ForwardPlan]:
        return self.plan.using(logits=True)

    def _reads_class_token_only(self) -> bool:
        """Whether the last block may compute the class-token row alone in this forward."""
        adapter, backbone = self.adapter, self.backbone
        last = len(adapter.blocks) - 1
        return (
            self._ledger.active  # disabled: exactly timm's forward
            and self.plan.logits
            and self.plan.class_token_readout
            and adapter.reads_class_token_only()
            and adapter.supports_selected_rows(last)
            # a checkpointed block is recomputed in backward, outside this pass, so it must not depend on it
            and not (getattr(backbone, "grad_checkpointing", False) and torch.is_grad_enabled())
            # hooks of this forward's adapters inside the last block may read rows other than the class token
            and not self._ledger.hooks_within(adapter.blocks[last], self.routing.present())
        )

    # ------------------------------------------------------------------ train mode

    def _modules_in_train_mode(self) -> list[nn.Module]:
        method = self.method
        if method.trains_backbone:
            return [self.backbone]
        return [*method.modules_in_train_mode(self.backbone), *self._adapter_heads(self.active_adapter)]

    #: re-estimate BatchNorm running statistics in tuned modules; off by default (few-shot batches of a
    #: handful of images give useless estimates), set by ``TrainConfig.batchnorm_stats``
    update_batchnorm_stats: bool = False

    def train(self, mode: bool = True) -> PromptModel:
        """Frozen parts stay in eval mode (no dropout, BatchNorm statistics fixed) unless the method tunes them;
        stochastic depth that the build options ask for (``backbone.options.drop_path_rate`` > 0) trains with
        the model.

        BatchNorm layers stay in eval mode (their pretrained running statistics in use and unchanged) even
        in tuned modules, unless ``update_batchnorm_stats``; their affine weights still train.
        """
        self.training = mode
        self.backbone.eval()
        # Stochastic depth asked for through the backbone options (timm's drop_path_rate) acts in training
        # whatever the method, as in DA-VPT's and SPT's code.
        for module in _stochastic_depth(self.backbone):
            module.train(mode)
        if self.active_adapter is not None and self._ledger.active:
            for module in self._modules_in_train_mode():
                module.train(mode)
                if mode and not self.update_batchnorm_stats:
                    for norm in module.modules():
                        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                            norm.eval()
        self.adapters.train(mode)
        return self

    # ------------------------------------------------------------------ disable and unload

    def _merged(self) -> bool:
        return bool(getattr(self.method, "merged", False))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the backbone computes exactly what it computed before ``wrap``.

        Every hook, injected layer and loop change of every adapter is taken out, the original heads are
        back in their slots, weights tuned in place hold their pre-wrap values, a merged adapter is
        unmerged; all of it comes back on exit.
        """
        if self._original is None:
            raise RuntimeError("this model was not made by wrap(); nothing to disable")
        merged = self._merged()
        if merged:
            self.unmerge()
        active = self.active_adapter
        self._swap_in_place(active, None)
        self._ledger.deactivate()
        self.backbone.num_classes = self._original.num_classes
        try:
            with self.routing.using(None):
                yield
        finally:
            self.backbone.num_classes = self.method.num_classes
            self._ledger.activate()
            self._swap_in_place(None, active)
            if merged:
                self.merge()

    def unload(self) -> nn.Module:
        """Take every adapter out and return the backbone as it was before ``wrap`` (weights, head, flags).

        The tuned tensors stay with this ``PromptModel``, which cannot run afterwards.
        """
        if self._original is None:
            raise RuntimeError("this model was not made by wrap(); nothing to unload")
        if self._merged():
            self.unmerge()
        self._swap_in_place(self.active_adapter, None)
        self._ledger.deactivate()
        backbone = self.backbone
        backbone.num_classes = self._original.num_classes
        for parameter, flag in self._original.requires_grad:
            parameter.requires_grad_(flag)
        del backbone.promptvit_wrapped
        self._original = None
        self.backbone = nn.Identity()
        self.adapter = None
        return backbone

    def merge(self) -> None:
        """Fold the active adapter into the backbone weights where its method allows (LoRA)."""
        self.method.merge()

    def unmerge(self) -> None:
        self.method.unmerge()

    def merge_problem(self) -> str | None:
        """Why the active adapter cannot be folded into the backbone's own weights, or None when it can (then
        :meth:`merge_and_unload` and the merged-timm export work)."""
        own = [n for n in self.tuned_state_dict() if not n.startswith("backbone.")]
        if own:
            return f"it adds tensors of its own ({listed(own)})"
        method = self.method
        head = self._adapter_heads(self.active_adapter)[0]
        if method.classifier_of(head) is not head:  # an MLP head: layers of its own before the classifier
            return f"its layers in {self.head_name.rpartition('.')[0]} do not fold into the backbone's weights"
        names = {id(m): n for n, m in self.backbone.named_modules()}
        injections = method.injections
        hooked = [e.module for kind in ("pre_hook", "hook") for e in injections.entries(kind)]
        if hooked:
            return f"it changes the forward of {listed(dict.fromkeys(names.get(id(m), '?') for m in hooked))}"
        loop = [kind for kind in LOOP_KINDS if injections.entries(kind)]
        if loop:
            return f"it changes the forward in the block loop ({listed(loop)})"
        layers = [
            f"{names.get(id(e.module), '?')}.{e.name}".lstrip(".")
            for e in injections.entries("replace")
            if isinstance(e.target, TunerLayer)
        ]
        if layers and not method.merges():
            return f"its layers in {listed(layers)} do not fold into the backbone's weights"
        return None

    def merge_and_unload(self) -> nn.Module:
        """The plain timm backbone with the active adapter folded into its weights and its tuned head (peft's
        ``merge_and_unload``); ``ConfigError`` where the method does not live in the backbone's weights. Other
        adapters are dropped.

        The ``PromptModel`` cannot run afterwards; :meth:`unload` gives the untouched backbone instead.
        """
        if self._original is None:
            raise RuntimeError("this model was not made by wrap(); nothing to merge and unload")
        problem = self.merge_problem()
        if problem is not None:
            raise ConfigError(
                f"method '{self.method.name}' cannot be merged into the backbone: {problem}; unload() gives "
                "the backbone back without it, and an ONNX export keeps it"
            )
        if self.method.merges():
            self.merge()
        heads = self._adapter_heads(self.active_adapter)
        self._ledger.deactivate()  # merged layers give back their base layers, now holding the sum
        backbone = self.backbone
        for (parent, name), head in zip(self.adapter.classifier_slots(), heads, strict=True):
            setattr(parent, name, head)
        backbone.num_classes = self.num_classes
        for parameter, flag in self._original.requires_grad:
            parameter.requires_grad_(flag)
        for head in heads:
            head.requires_grad_(False)
        del backbone.promptvit_wrapped
        self._original = None
        self.backbone = nn.Identity()
        self.adapter = None
        return backbone

    def save_pretrained(
        self, directory: str | Path, *, selected_adapters: Sequence[str] | None = None, **extra: Any
    ) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (tuned tensors only) of the active
        adapter into ``directory``; with ``selected_adapters``, of each one, as peft lays them out:
        ``"default"`` in ``directory``, any other in ``directory/<name>``.

        The config records how the backbone was built (``self.source``); where that record cannot rebuild it
        (weights of unknown origin), a warning says so and ``load`` will need ``base_model=``.
        """
        problem = rebuild_problem(self.source)
        if problem is not None:
            warnings.warn(
                f"{directory}: the backbone cannot be rebuilt from the artifact ({problem}); loading it needs "
                f"base_model={base_model_call(self.source)} with the weights it was trained on. Build the "
                "backbone with promptvit.create_backbone (Hub name, local weights file or init_seed) to record it",
                stacklevel=2,
            )
        if selected_adapters is None:
            return save_artifact(self, directory, adapter_name=self.active_adapter, **extra)
        for name in selected_adapters:
            self._check_known(name)
        for name in selected_adapters:
            target = Path(directory) if name == "default" else Path(directory) / name
            save_artifact(self, target, adapter_name=name, **extra)
        return Path(directory)

    def load_adapter(
        self, path_or_hub_id: str | Path, adapter_name: str, *, check_weights: bool = True
    ) -> Method:
        """Add the adapter saved at ``path_or_hub_id`` (an artifact or run folder, or ``hf-hub:ORG/NAME``)
        under ``adapter_name`` (not made active: see :meth:`set_adapter`); returns its method.

        The artifact must fit this backbone's geometry and, unless ``check_weights=False``, its weights.
        """
        directory, config, weights_path, state = read_artifact(local_folder(path_or_hub_id))
        check_artifact_fits(directory, config, self.geometry, self.base_fingerprint, check_weights)
        method = self.add_adapter(adapter_name, method_config(config), num_classes=config["num_classes"])
        try:
            load_tuned_state(self, state, str(weights_path), adapter_name=adapter_name)
        except Exception:
            if len(self.adapters) > 1:
                self.delete_adapter(adapter_name)
            raise
        return method

    def save_peft_adapter(self, directory: str | Path) -> Path:
        """Write the method as a Hugging Face peft adapter (``adapter_config.json``, ``adapter_model.safetensors``):
        ``PeftModel.from_pretrained(<the timm base with num_classes outputs>, directory)`` then computes these
        logits. ``ConfigError`` where peft has no equivalent of the method."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        form = self.method.peft_form(self.backbone)
        if form is None:
            raise ConfigError(f"method '{self.method.name}' has no Hugging Face peft equivalent")
        names = {id(m): n for n, m in self.backbone.named_modules()}
        slots = [".".join(filter(None, [names[id(parent)], name])) for parent, name in self.adapter.classifier_slots()]
        config = LoraConfig(**form.config, modules_to_save=slots, init_lora_weights=False)
        config.base_model_name_or_path = self.source.get("name")
        tensors = {f"base_model.model.{n}": t for n, t in form.tensors.items()}
        for slot, head in zip(slots, self._adapter_heads(self.active_adapter), strict=True):
            for name, tensor in head.state_dict().items():
                tensors[f"base_model.model.{slot}.{name}"] = tensor.detach()
        directory = Path(directory)
        config.save_pretrained(str(directory))
        state = {k: v.contiguous().cpu() for k, v in tensors.items()}
        atomic_write(directory / "adapter_model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        return directory

    def push_to_hub(self, repo_id: str, **options: Any) -> str:
        """Upload the artifact and a model card to the Hugging Face Hub (a LoRA also as a peft adapter in
        ``peft/``); see :func:`promptvit.hub.push_to_hub`."""
        from promptvit.hub import push_to_hub

        return push_to_hub(self, repo_id, **options)

    @classmethod
    def from_pretrained(
        cls, source: str | Path, base_model: nn.Module | None = None, *, check_weights: bool = True
    ) -> PromptModel:
        """Load an artifact: a folder, a run folder or ``hf-hub:ORG/NAME[@revision]`` (online or from the cache).

        The backbone is rebuilt from the artifact's record of how it was built, or ``base_model`` (a plain timm
        model) is used; it must have the geometry the artifact was trained on and, unless
        ``check_weights=False``, the same weights (compared by fingerprint). ``ArtifactError`` says what differs.
        """
        directory = resolve_artifact_dir(local_folder(source))
        config = read_artifact_config(directory)
        weights_path, state = read_artifact_weights(directory, config)
        try:
            Geometry.from_dict(config["geometry"])
            config_of_method = method_config(config)
        except ValueError as error:  # ConfigError too
            raise ArtifactError(
                f"{directory / CONFIG_FILE} is damaged or from a promptvit with other methods ({error}); re-save it"
            ) from error
        given = base_model is not None
        if base_model is None:
            base_model = _rebuild_base(config, directory)
        adapter_for(base_model).reset_classifier(config["num_classes"])
        differences = geometry_differences(config, geometry_of(base_model))
        if differences:
            raise ArtifactError(f"{directory} was trained on another backbone geometry ({differences})")
        model = wrap(base_model, config_of_method)
        if check_weights and config["base_fingerprint"] != model.base_fingerprint:
            raise ArtifactError(
                f"{directory} was trained on other backbone weights (fingerprint {config['base_fingerprint']} "
                f"vs {model.base_fingerprint} of the {'given' if given else 'rebuilt'} model, base "
                f"'{config['base_model'].get('name')}'). Load it with "
                f"base_model={base_model_call(config['base_model'])} holding the weights it was trained on "
                "(check_weights=False skips this check)"
            )
        load_tuned_state(model, state, str(weights_path))
        return model


def _rebuild_base(config: dict[str, Any], directory: Path) -> nn.Module:
    """The backbone an artifact records (:mod:`promptvit.backbones.source`), or an ``ArtifactError`` saying what to do."""
    record = config["base_model"]
    problem = rebuild_problem(record)
    if problem is not None:
        raise ArtifactError(
            f"{directory} cannot rebuild its backbone: {problem}. Load it from Python with "
            f"base_model={base_model_call(record)} holding the weights it was trained on"
        )
    weights_file = None
    if origin_of(record) == "file":
        weights_file = find_weights_file(record, directory)
        if weights_file is None:
            name = Path(record["weights"]).name
            raise ArtifactError(
                f"the backbone weights file {record['weights']} named in {directory / CONFIG_FILE} is not there: "
                f"copy it back, or to {directory / name}, or set base_model.weights in that file to where it is now"
            )
    try:
        return rebuild_backbone(record, weights_file)
    except BackboneError as error:
        raise ArtifactError(f"cannot rebuild the backbone of {directory}: {error}") from error


def method_config(artifact_config: dict[str, Any]) -> MethodConfig:
    """The method config an artifact's ``adapter_config.json`` records."""
    method_cls = get_method(artifact_config["method"])
    return method_cls.config_class.from_dict(artifact_config["method_config"], method=method_cls.name)


def check_artifact_fits(
    directory: Path, config: dict[str, Any], geometry: Geometry, fingerprint: str, check_weights: bool = True
) -> None:
    """Refuse an artifact trained on another backbone geometry or (``check_weights``) other weights."""
    differences = geometry_differences(config, geometry)
    if differences:
        raise ArtifactError(f"{directory} was trained on another backbone geometry ({differences})")
    if check_weights and config.get("base_fingerprint") != fingerprint:
        raise ArtifactError(
            f"{directory} was trained on other backbone weights (fingerprint {config.get('base_fingerprint')} vs "
            f"{fingerprint}); load it onto the same pretrained backbone, or pass check_weights=False"
        )


def wrap(
    model: nn.Module,
    method: str | MethodConfig = "linear",
    *,
    num_classes: int | None = None,
    base_model_name: str | None = None,
    adapter_name: str = "default",
    **options: Any,
) -> PromptModel:
    """Attach a tuning method to a timm model as its first adapter, and freeze everything else.

    Args:
        model: a timm ViT (or, for methods that allow it, a timm CNN); it is modified in place.
        method: a registered method name (see ``available_methods()``) or a method config object.
        num_classes: size of a new classifier head; ``None`` keeps (a copy of) the model's own head.
        base_model_name: timm name (with pretrained tag) recorded in saved artifacts so that ``load``
            can rebuild the backbone; by default read from the model (:mod:`promptvit.backbones.source`).
        adapter_name: the name of this first adapter (peft's ``"default"``).
        **options: the method's options, e.g. ``prompt_length=20, deep=True`` for ``vpt``.
    """
    if isinstance(model, PromptModel):
        raise ConfigError("this model is already wrapped; use model.add_adapter() to add another method")
    if getattr(model, "promptvit_wrapped", False):
        raise ConfigError(
            "this backbone is already wrapped by another PromptModel (wrapping changes it in place); wrap a "
            "fresh backbone or copy.deepcopy(backbone), call add_adapter() on the first model, or unload() it"
        )
    make_config(method, **options)  # a bad method or option is refused before the backbone changes
    training = model.training
    family = adapter_for(model)
    family.geometry()
    heads = family.classifier_modules()
    head_modules = {id(m) for head in heads for m in head.modules()}
    original = _Original(
        heads=heads,
        num_classes=family.num_classes(),
        requires_grad=[(p, p.requires_grad) for p in model.parameters()],
        parameters={id(p) for p in model.parameters()},
        modules=[m for m in model.modules() if id(m) not in head_modules],
    )
    # The head is new or replaced per task, so only the body identifies the backbone.
    fingerprint = weights_fingerprint(body_parameters(model))
    source = backbone_source(model, fingerprint)  # read before the head changes (num_classes is an option)
    if base_model_name is not None:
        source["name"] = base_model_name
    wrapped = PromptModel(model, source, fingerprint, original)
    try:
        wrapped.add_adapter(adapter_name, method, num_classes=num_classes, **options)
    except Exception:
        wrapped._ledger.deactivate()
        raise
    model.requires_grad_(False)
    wrapped.set_adapter(adapter_name)
    model.promptvit_wrapped = True
    wrapped.train(training)
    return wrapped


def _stochastic_depth(backbone: nn.Module) -> list[nn.Module]:
    """timm's DropPath modules of ``backbone`` that drop something, when its build options asked for them.

    Only an explicit ``drop_path_rate`` (``create_backbone``'s record, ``backbone.options``) counts: a
    family's own default rate (timm builds Swin with 0.1) stays off in a frozen backbone, as it always was.
    """
    options = getattr(backbone, "promptvit_source", {}).get("kwargs", {})
    if not options.get("drop_path_rate"):
        return []
    return [m for m in backbone.modules() if isinstance(m, DropPath) and m.drop_prob > 0]
