"""What tuning methods may change in a backbone, recorded so that it can be switched off and undone; the
per-adapter containers and routing that let several adapters share one backbone.

Every change an adapter's method makes goes through the model's :class:`Injections` ledger, which records
the adapter as an *owner* of the entry:

* forward hooks and forward pre-hooks, each kept by its torch handle;
* module replacements (a :class:`TunerLayer` that keeps the frozen module as ``base_layer``). Adapters of
  one kind share one layer per slot (``layer(...)``), each with its own entry in the layer's
  :class:`PerAdapter` containers;
* *loop changes*, which the model's block loop applies (:mod:`promptvit.layers.block_plan`): prompt tokens
  inserted before blocks (``insert_tokens``), a block's input changed (``change_block_input``), the images
  changed before the embedding (``change_images``).

An entry lives while one of its owners does (``release(owner)`` undoes what only that adapter needed);
``deactivate()`` takes every change out in reverse order (the backbone is then timm's own module tree and
the loop changes nothing), ``activate()`` puts them back in the original order.
``PromptModel.disable_adapter()``, ``delete_adapter()`` and ``unload()`` are built on this. Nothing here
reads torch's private hook dictionaries: a handle removes its hook, also in a ``copy.deepcopy`` of the
model (torch copies the handle together with the module's hook dictionary it points into).

:class:`AdapterRouting` says which adapter each sample of the current forward uses (one for the whole
batch, or one per sample in a mixed batch); tuner layers and hooks read it and apply each adapter present
to its own rows, as peft's ``_mixed_batch_forward`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class PerAdapter(nn.ModuleDict):
    """Adapter name -> that adapter's module, inside a tuner layer (or the model's methods).

    In artifact keys the container and the adapter name vanish, or become ``artifact_name``:
    ``qkv.lora.<name>.lora_A`` is saved as ``qkv.lora_A``, so an adapter's file does not depend on its name
    or on the other adapters attached.
    """

    def __init__(self, artifact_name: str = "") -> None:
        super().__init__()
        self.artifact_name = artifact_name


@dataclasses.dataclass
class AdapterRouting:
    """Which adapter the samples of the current forward use; one object shared by a model and its layers.

    ``active``: the adapter of every sample (``None``: none, the backbone's own forward). ``per_sample``:
    one adapter name per sample (a mixed batch), or ``None``.
    """

    active: str | None = None
    per_sample: tuple[str, ...] | None = None
    _rows: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)

    def groups(
        self, names: Collection[str], size: int | None = None
    ) -> list[tuple[str, torch.Tensor | None]]:
        """The adapters among ``names`` this forward uses, each with its rows (``None``: every row).

        ``size``: the leading size of the tensor the rows index, when it is a multiple of the batch (a
        layer inside Swin's windows sees ``batch * windows`` rows, each sample's windows one after another).
        """
        if self.per_sample is None:
            return [(self.active, None)] if self.active is not None and self.active in names else []
        batch = len(self.per_sample)
        per_sample = 1 if size is None else size // batch
        if per_sample * batch != (batch if size is None else size):
            raise ValueError(f"a layer saw {size} rows in a mixed batch of {batch} samples")
        groups = []
        for name, rows in self._rows.items():
            if name in names:
                if per_sample > 1:
                    offsets = torch.arange(per_sample, device=rows.device)
                    rows = (rows[:, None] * per_sample + offsets).flatten()
                groups.append((name, rows))
        return groups

    def present(self) -> list[str]:
        """The adapters this forward uses."""
        if self.per_sample is None:
            return [] if self.active is None else [self.active]
        return list(self._rows)

    @contextlib.contextmanager
    def using(
        self, active: str | None, per_sample: Sequence[str] | None = None, device: torch.device | None = None
    ) -> Iterator[AdapterRouting]:
        """Route the forwards within the block: every sample to ``active``, or sample ``i`` to
        ``per_sample[i]`` (row index tensors made on ``device``)."""
        previous = (self.active, self.per_sample, self._rows)
        self.active = active
        self.per_sample = None if per_sample is None else tuple(per_sample)
        self._rows = {}
        if per_sample is not None:
            for name in dict.fromkeys(per_sample):
                rows = [i for i, n in enumerate(per_sample) if n == name]
                self._rows[name] = torch.tensor(rows, dtype=torch.long, device=device)
        try:
            yield self
        finally:
            self.active, self.per_sample, self._rows = previous


def on_rows(
    x: torch.Tensor, rows: torch.Tensor | None, change: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``change`` applied to the ``rows`` of ``x`` (every row when ``rows`` is None), out of place."""
    if rows is None:
        return change(x)
    return x.index_copy(0, rows, change(x[rows]).to(x.dtype))


class TunerLayer(nn.Module):
    """Base of layers put in place of a backbone module (LoRA linear, adapter, prompted attention, heads).

    The replaced module stays inside as ``base_layer``; each adapter's tensors live in the layer's
    :class:`PerAdapter` containers, and ``routing`` says which of them the current forward applies to which
    rows.
    """

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        #: a layer made on its own serves one adapter, "default"; a model passes its shared routing
        self.routing = routing if routing is not None else AdapterRouting(active="default")

    def per_adapter(self) -> list[PerAdapter]:
        return [module for module in self.children() if isinstance(module, PerAdapter)]

    @property
    def adapter_names(self) -> list[str]:
        """Adapters that have tensors in this layer."""
        return list(dict.fromkeys(name for container in self.per_adapter() for name in container))

    def delete_adapter(self, name: str) -> None:
        for container in self.per_adapter():
            if name in container:
                del container[name]


#: entry kinds that change modules; the others are read by the block loop
MODULE_KINDS = ("pre_hook", "hook", "replace")
LOOP_KINDS = ("tokens", "block_input", "images")


@dataclasses.dataclass(eq=False)
class _Injection:
    kind: str  # one of MODULE_KINDS or LOOP_KINDS
    module: nn.Module | None  # hooked module, or the parent of a replaced child
    target: Any  # the hook, the replacement module, or the loop change
    name: str = ""  # attribute of a replaced child
    original: Any = None  # the replaced child
    handle: RemovableHandle | None = None  # of a registered hook while it is in
    with_kwargs: bool = False  # a pre-hook that also receives and may change the keyword arguments
    index: int = 0  # block of a block-input change
    key: Hashable | None = (
        None  # a second owner asking for the same (kind, module, name, key) joins this entry
    )
    owners: list[str] = dataclasses.field(default_factory=list)  # the adapters that need it


@dataclasses.dataclass
class ForwardPlan:
    """How a wrapped model's forward runs: one object shared by ``PromptModel`` and its method.

    Fields change only for the length of a ``with plan.using(...)`` block, so no mode outlives the code that
    asked for it. The plan decides which output rows blocks compute; it never changes the logits (beyond
    float rounding).
    """

    #: the current forward computes logits (``forward``, ``forward_from_block``), not hidden tokens
    logits: bool = False
    #: in a logits pass, the last block computes only the rows the head reads (the class token)
    class_token_readout: bool = True
    #: blocks whose prompt outputs are discarded next (replaced, or stripped at the final norm) skip them
    skip_prompt_outputs: bool = True
    #: token prompts are inserted (off for a prompt-free forward, e.g. a data-dependent prompt init)
    token_prompts: bool = True
    #: called ``(stage, stage_input, stage_output)`` for each stage a family runs block by block itself rather
    #: than through the stage module (Swin's stages with prompts), whose forward hooks therefore do not fire
    stage_outputs: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    @contextlib.contextmanager
    def using(self, **fields: Any) -> Iterator[ForwardPlan]:
        """Set ``fields`` within the block; the previous values come back on exit."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"ForwardPlan has no field(s) {sorted(unknown)}")
        previous = {name: getattr(self, name) for name in fields}
        for name, value in fields.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in previous.items():
                setattr(self, name, value)


class Injections:
    """The ledger of every adapter's changes to one backbone (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: list[_Injection] = []
        self.active = True

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[_Injection]:
        return iter(list(self._entries))

    def for_adapter(self, owner: str) -> AdapterInjections:
        """The view an adapter's method writes through: every change it records names ``owner``."""
        return AdapterInjections(self, owner)

    def entries(self, kind: str, owners: Collection[str] | None = None) -> list[_Injection]:
        """The recorded changes of one kind (of some owners), in the order they were made."""
        return [
            entry
            for entry in self._entries
            if entry.kind == kind and (owners is None or any(o in owners for o in entry.owners))
        ]

    def hooks_within(self, module: nn.Module, owners: Collection[str] | None = None) -> bool:
        """Whether a recorded hook (of some owners) sits on ``module`` or on a module inside it."""
        hooked = {id(entry.module) for kind in ("pre_hook", "hook") for entry in self.entries(kind, owners)}
        return bool(hooked) and any(id(m) in hooked for m in module.modules())

    def record(self, owner: str, entry: _Injection) -> _Injection:
        """Apply ``entry`` for ``owner``, or join the entry with the same kind, module, name and key."""
        if not self.active:
            raise RuntimeError("cannot change a backbone while its adapters are disabled")
        if entry.key is not None:
            for existing in self._entries:
                if (existing.kind, existing.module, existing.name, existing.key) == (
                    entry.kind,
                    entry.module,
                    entry.name,
                    entry.key,
                ):
                    if owner not in existing.owners:
                        existing.owners.append(owner)
                    return existing
        if entry.kind == "replace":
            entry.original = getattr(entry.module, entry.name)
        entry.owners = [owner]
        self._apply(entry)
        self._entries.append(entry)
        return entry

    def release(self, owner: str) -> None:
        """Forget ``owner``; the changes no other adapter needs are undone, last first."""
        for entry in reversed(self._entries):
            if owner in entry.owners:
                entry.owners.remove(owner)
                if not entry.owners:
                    if self.active:
                        self._undo(entry)
                    self._entries.remove(entry)

    @staticmethod
    def _apply(entry: _Injection) -> None:
        if entry.kind == "pre_hook":
            entry.handle = entry.module.register_forward_pre_hook(entry.target, with_kwargs=entry.with_kwargs)
        elif entry.kind == "hook":
            entry.handle = entry.module.register_forward_hook(entry.target)
        elif entry.kind == "replace":
            setattr(entry.module, entry.name, entry.target)

    @staticmethod
    def _undo(entry: _Injection) -> None:
        if entry.handle is not None:
            entry.handle.remove()
            entry.handle = None
        elif entry.kind == "replace":
            setattr(entry.module, entry.name, entry.original)

    def deactivate(self) -> None:
        """Take every change out, last first; the backbone is back to its own modules and hooks."""
        if self.active:
            for entry in reversed(self._entries):
                self._undo(entry)
            self.active = False

    def activate(self) -> None:
        """Put every change back, in the order it was first made."""
        if not self.active:
            for entry in self._entries:
                self._apply(entry)
            self.active = True


class AdapterInjections:
    """One adapter's view of the model's :class:`Injections`: what its method records names it as owner.

    ``key`` (hooks and replacements): a change several adapters need once (a family's position hooks for
    inserted tokens, a switch of the attention) is recorded with a key, and a second adapter joins it.
    """

    def __init__(self, ledger: Injections, owner: str) -> None:
        self.ledger = ledger
        self.owner = owner

    @property
    def active(self) -> bool:
        return self.ledger.active

    def __iter__(self) -> Iterator[_Injection]:
        return (entry for entry in self.ledger if self.owner in entry.owners)

    def entries(self, kind: str) -> list[_Injection]:
        return self.ledger.entries(kind, (self.owner,))

    def pre_hook(
        self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False, key: Hashable = None
    ) -> None:
        self.ledger.record(self.owner, _Injection("pre_hook", module, hook, with_kwargs=with_kwargs, key=key))

    def hook(self, module: nn.Module, hook: Callable[..., Any], *, key: Hashable = None) -> None:
        self.ledger.record(self.owner, _Injection("hook", module, hook, key=key))

    def replace(self, parent: nn.Module, name: str, replacement: Any, *, key: Hashable = None) -> Any:
        """Put ``replacement`` at ``parent.<name>`` (the original comes back when the entry is undone);
        returns what is there afterwards (the earlier replacement when ``key`` joins an entry)."""
        return self.ledger.record(
            self.owner, _Injection("replace", parent, replacement, name=name, key=key)
        ).target

    def layer(
        self,
        parent: nn.Module,
        name: str,
        layer_class: type[TunerLayer],
        make: Callable[[nn.Module], TunerLayer],
    ) -> TunerLayer:
        """The ``layer_class`` tuner layer at ``parent.<name>``: the one another adapter put there, or
        ``make(the module there)`` put in place of it."""
        current = getattr(parent, name)
        replacement = current if isinstance(current, layer_class) else make(current)
        return self.replace(parent, name, replacement, key=layer_class)

    def insert_tokens(self, schedule: Any) -> None:
        """Prompt tokens the block loop inserts (a :class:`~promptvit.layers.token_prompts.TokenSchedule`)."""
        self.ledger.record(self.owner, _Injection("tokens", None, schedule))

    def change_block_input(self, block: int, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``change(x)`` replaces the input ``x`` of ``blocks[block]`` in the block loop (after inserted
        tokens); in a mixed batch it gets this adapter's rows only."""
        self.ledger.record(self.owner, _Injection("block_input", None, change, index=block))

    def change_images(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``change(images)`` replaces the images before the embedding (pixel prompts)."""
        self.ledger.record(self.owner, _Injection("images", None, change))
