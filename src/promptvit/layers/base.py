"""What a tuning method may change in a backbone, recorded so that it can be switched off and undone.

Every change a method makes to the backbone goes through its :class:`Injections` ledger: forward hooks,
forward pre-hooks, module replacements (a :class:`TunerLayer` that keeps the frozen module as
``base_layer``) and, for blocks whose computation a plan changes, a forward override. ``deactivate()``
takes them all out in reverse order (the backbone is then timm's own module tree), ``activate()`` puts
them back in the original order. ``PromptModel.disable_adapter()`` and ``unload()`` are built on this.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


class TunerLayer(nn.Module):
    """Base of layers a method puts in place of a backbone module (LoRA linear, adapter, prompted attention).

    The replaced module stays inside as ``base_layer``.
    """


@dataclasses.dataclass
class _Injection:
    kind: str  # "pre_hook" | "hook" | "replace" | "forward"
    module: nn.Module  # hooked module, or the parent of a replaced child
    target: Any  # the hook function, the replacement module, or the forward override
    name: str = ""  # attribute of a replaced child
    original: Any = None  # the replaced child
    hook_id: int | None = None  # key of a registered hook in the module's hook dict (survives deepcopy)
    with_kwargs: bool = False  # a pre-hook that also receives and may change the keyword arguments


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

    @contextlib.contextmanager
    def using(self, **fields: bool) -> Iterator[ForwardPlan]:
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
    """The ledger of one method's changes to one backbone (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: list[_Injection] = []
        self.active = True

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self, kind: str) -> list[_Injection]:
        """The recorded changes of one kind (``pre_hook``, ``hook``, ``replace``, ``forward``), in order."""
        return [entry for entry in self._entries if entry.kind == kind]

    def pre_hook(self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        self._add(_Injection("pre_hook", module, hook, with_kwargs=with_kwargs))

    def hook(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        self._add(_Injection("hook", module, hook))

    def replace(self, parent: nn.Module, name: str, replacement: nn.Module) -> nn.Module:
        """Put ``replacement`` at ``parent.<name>``; the original comes back on ``deactivate``."""
        self._add(_Injection("replace", parent, replacement, name=name, original=getattr(parent, name)))
        return replacement

    def override_forward(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        """Let ``module.forward`` (an instance attribute) be ``forward``; hooks of the module still run.

        An override already there (another ledger's) comes back on ``deactivate``.
        """
        self._add(_Injection("forward", module, forward))

    def _add(self, entry: _Injection) -> None:
        if not self.active:
            raise RuntimeError("cannot change a backbone while its method is deactivated")
        self._apply(entry)
        self._entries.append(entry)

    @staticmethod
    def _apply(entry: _Injection) -> None:
        if entry.kind == "pre_hook":
            handle = entry.module.register_forward_pre_hook(entry.target, with_kwargs=entry.with_kwargs)
            entry.hook_id = handle.id
        elif entry.kind == "hook":
            entry.hook_id = entry.module.register_forward_hook(entry.target).id
        elif entry.kind == "replace":
            setattr(entry.module, entry.name, entry.target)
        else:
            entry.original = entry.module.__dict__.get("forward")
            entry.module.forward = entry.target

    @staticmethod
    def _undo(entry: _Injection) -> None:
        if entry.hook_id is not None:
            # What RemovableHandle.remove() does; a handle object would point into the hook dict of the
            # module it was made for, not into that of a deep copy, so the ledger keeps the id only.
            hooks = (
                entry.module._forward_pre_hooks if entry.kind == "pre_hook" else entry.module._forward_hooks
            )
            del hooks[entry.hook_id]
            entry.module._forward_pre_hooks_with_kwargs.pop(entry.hook_id, None)
            entry.hook_id = None
        elif entry.kind == "replace":
            setattr(entry.module, entry.name, entry.original)
        elif entry.original is not None:
            entry.module.forward = entry.original
        else:
            del entry.module.forward

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


#: kinds of :class:`BatchedChange`
CHANGE_KINDS = (
    "add_tokens",
    "scale_tokens",
    "add_pixels",
    "token_prompts",
    "attention_logits",
    "qkv_low_rank",
)


@dataclasses.dataclass
class BatchedChange:
    """One change a method makes to the backbone, as tensors the multi-task server stacks per task.

    * ``add_tokens`` / ``scale_tokens``: ``tensors["delta"]`` (N, d) added to / multiplying ``1 + delta``
      with the input tokens of ``block``;
    * ``add_pixels``: ``tensors["frame"]`` (3, H, W) added to the images;
    * ``token_prompts``: ``schedule`` (block -> (tokens in the stream before it, tokens it puts in)),
      ``prompts_at_norm`` and ``tensors[str(block)]`` (L, d) for every block that inserts;
    * ``attention_logits``: at ``block``, ``tensors`` has ``lse`` (N,) (log-sum-exp of an extra softmax
      column per query), and optionally ``bias`` (N, N) added to the logits or ``temperature`` (N, 1);
    * ``qkv_low_rank``: at ``block``, ``tensors`` has ``a`` (3, r, D) and ``b`` (3, P, r) (scaling folded
      into b, zeros for parts the method does not adapt): ``qkv += x @ a^T @ b^T`` per part.
    """

    kind: str
    block: int = 0
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    schedule: dict[int, tuple[int, int]] | None = None
    prompts_at_norm: int = 0

    def __post_init__(self) -> None:
        if self.kind not in CHANGE_KINDS:
            raise ValueError(f"unknown batched change kind {self.kind!r}; expected one of {CHANGE_KINDS}")
