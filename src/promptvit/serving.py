"""Batched multi-task inference: many saved artifacts of one backbone served by one batched forward.

``MultiTaskModel(base_backbone, [artifact dirs or PromptModels])`` keeps ONE frozen copy of the backbone
and, per task, only what the task tunes. A batch of images with task ids (or every task for every image)
runs through the shared backbone once; each sample uses its own task's tensors, gathered per sample.

The server never looks at method names: each method declares its changes as
:class:`~promptvit.methods.base.BatchedChange` objects (``Method.batched_changes``), of a few generic kinds:

* none at all (``[]``): only the head differs; all such tasks of an image share one backbone pass;
* ``add_tokens`` / ``scale_tokens`` / ``add_pixels``: a tensor added to (or scaling) a block's input tokens,
  or added to the images;
* ``attention_logits``: one padded key holding ``LSE_k P_ik`` (``-inf`` for samples whose task has none
  there), a logit bias or a query temperature in one block's attention;
* ``qkv_low_rank``: low-rank q/k/v deltas per block, every task's factors padded to a common rank;
* ``token_prompts``: inserted tokens; samples are grouped by insertion schedule (blocks and lengths).

A method whose ``batched_changes`` is ``None``, or any method but head-only ones on a CNN, falls back to a
per-task forward of the task's own ``PromptModel`` on its samples. ``batched_tasks`` and ``fallback_tasks``
list the split.

Results equal per-task inference up to float rounding (the batched attention of a block where some sample
has extra logits runs the masked SDPA path for every sample of the batch, and low-rank deltas are computed
with the scaling folded into B); the tests hold them to 1e-5 in float32.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptvit.backbones import (
    BackboneError,
    adapter_for,
    attend,
    body_parameters,
    sdpa_core,
    weights_fingerprint,
)
from promptvit.evaluation.probability import scores_from_logits
from promptvit.layers.base import Injections
from promptvit.layers.token_prompts import replace_prompts, strip_prompts
from promptvit.methods.base import BatchedChange, ConfigError
from promptvit.model import PromptModel


def _body_fingerprint(backbone: nn.Module) -> str:
    return weights_fingerprint(body_parameters(backbone))


@dataclass
class _Task:
    name: str
    method: str
    num_classes: int
    model: PromptModel | None = None  # kept for fallback tasks only
    row: int = 0  # row in the per-task tables (0: plain, no backbone change)
    schedule: tuple | None = None  # token-prompt insertion signature
    head: nn.Module | None = None


@dataclass
class _Context:
    rows: torch.Tensor  # (B,) table row per sample
    logit_blocks: set[int] = field(default_factory=set)
    low_rank_blocks: set[int] = field(default_factory=set)
    add_blocks: set[int] = field(default_factory=set)
    mul_blocks: set[int] = field(default_factory=set)
    frame: bool = False
    insertion: dict[int, torch.Tensor] | None = None  # block -> (B, L, d) prompts
    schedule: dict[int, tuple[int, int]] | None = None
    prompts_at_norm: int = 0


class _Tables(nn.Module):
    """Per-task tensors stacked by table row; row 0 is the identity (no change)."""


class _MultiTaskAttention(nn.Module):
    """A frozen attention plus per-sample extra logits and low-rank q/k/v deltas from the owner's tables."""

    def __init__(self, base: nn.Module, block: int, owner: MultiTaskModel) -> None:
        super().__init__()
        self.base_layer = base
        self.block = block
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        owner = self._owner[0]
        ctx = owner._context
        logits = ctx is not None and self.block in ctx.logit_blocks
        low_rank = ctx is not None and self.block in ctx.low_rank_blocks
        if attn_mask is not None or is_causal:
            if not (logits or low_rank):
                return self.base_layer(x, attn_mask=attn_mask, is_causal=is_causal)
            raise NotImplementedError("multi-task attention does not support attention masks")
        if not (logits or low_rank):
            return self.base_layer(x)  # timm < 1.0.1x attention takes no mask arguments
        tables, rows = owner.tables, ctx.rows
        delta = None
        if low_rank:
            a = getattr(tables, f"lora_a_{self.block}")[rows]  # (B, 3, R, D)
            b = getattr(tables, f"lora_b_{self.block}")[rows]  # (B, 3, P, R), scaling folded in
            delta = torch.einsum("bnpr,bpor->bnpo", torch.einsum("bnd,bprd->bnpr", x, a), b).flatten(-2)
        parts = owner.adapter.attention(self.block)
        core = functools.partial(self._extra_logits, rows, x.shape[1]) if logits else sdpa_core
        return attend(parts, x, core=core, qkv_delta=delta)

    def _extra_logits(self, rows, n, q, k, v, scale, dropout_p):
        tables = self._owner[0].tables
        temperature = getattr(tables, f"ept_temperature_{self.block}", None)
        if temperature is not None:
            q = q * (1 + temperature[rows]).unsqueeze(1).to(q.dtype)  # (B, 1, N, 1)
        lse = getattr(tables, f"ept_lse_{self.block}")[rows]  # (B, N), -inf: no extra column
        bias = getattr(tables, f"ept_bias_{self.block}", None)
        if lse.shape[-1] != n:
            raise ValueError(f"extra logits have {lse.shape[-1]} rows but block {self.block} got {n} tokens")
        column = lse.unsqueeze(-1).to(q.dtype)  # (B, N, 1)
        if bias is not None:
            mask = torch.cat([bias[rows].to(q.dtype), column], dim=-1)
        else:
            mask = F.pad(column, (n, 0))
        k = F.pad(k, (0, 0, 0, 1))
        v = F.pad(v, (0, 0, 0, 1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), scale=scale)


class MultiTaskModel(nn.Module):
    """Serve several tasks (artifacts or wrapped models) of ONE backbone with batched forwards.

    Args:
        base_backbone: the plain timm backbone every task was trained on (not modified; a copy is kept).
        tasks: artifact folders (loaded with :func:`promptvit.load`) or ``PromptModel``s on that backbone.
        names: one name per task (default: the artifact folder name, else ``task{i}``).
        check_weights: refuse tasks trained on other backbone weights (fingerprint check).

    ``forward(images, task_ids=None)`` returns ``{task name: logits}``: with ``task_ids=None`` every task's
    logits for every image, ``(B, C_t)``; with ``task_ids`` (``(B,)`` task indices or names) each task present
    gets the logits of its own samples, rows in batch order (``images[task_ids == t]``).
    :meth:`logits_per_sample` gives one logits row per image instead.
    """

    def __init__(
        self,
        base_backbone: nn.Module,
        tasks: Sequence[str | Path | PromptModel],
        *,
        names: Sequence[str] | None = None,
        check_weights: bool = True,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("no tasks to serve")
        if names is not None and len(names) != len(tasks):
            raise ValueError(f"{len(names)} names for {len(tasks)} tasks")
        self.geometry = adapter_for(base_backbone).geometry()
        fingerprint = _body_fingerprint(base_backbone)
        backbone = copy.deepcopy(base_backbone).eval().requires_grad_(False)
        self.backbone = backbone
        self.adapter = adapter_for(backbone)
        self.adapter.set_classifier(nn.Identity())
        self.tables = _Tables()
        self.heads = nn.ModuleDict()
        self.fallback = nn.ModuleDict()
        self._context: _Context | None = None
        self.tasks: list[_Task] = []
        models = []
        calibrations: dict[str, Any] = {}
        for index, task in enumerate(tasks):
            name = names[index] if names is not None else None
            if isinstance(task, PromptModel):
                model = task
                if check_weights and model.base_fingerprint != fingerprint:
                    raise ConfigError(
                        f"task {index} was trained on other backbone weights (fingerprint {model.base_fingerprint} "
                        f"vs {fingerprint}); pass check_weights=False to override"
                    )
                name = name or f"task{index}"
            else:
                from promptvit.artifact import load

                model = load(task, base_model=copy.deepcopy(base_backbone), check_weights=check_weights)
                name = name or Path(task).name
                calibrations[name] = _stored_calibration(task)  # (calibration or None, multilabel)
            if model.geometry != self.geometry:
                raise ConfigError(f"task '{name}' was built for another backbone geometry")
            if name in {t.name for t in self.tasks}:
                raise ValueError(f"duplicate task name '{name}'")
            models.append(model.eval())
            self.tasks.append(_Task(name=name, method=model.method.name, num_classes=model.num_classes))
        self._build(models)
        self._install_hooks()
        self.calibrations = calibrations  # artifact task name -> (stored Calibration or None, multilabel)

    # ------------------------------------------------------------------ construction

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def batched_tasks(self) -> list[str]:
        return [t.name for t in self.tasks if t.model is None]

    @property
    def fallback_tasks(self) -> list[str]:
        return [t.name for t in self.tasks if t.model is not None]

    def _changes(self, model: PromptModel) -> list[BatchedChange] | None:
        """The task's batched changes; None for a per-task fallback.

        CNNs batch head-only tasks only; a family with several classifiers (distilled ViT) batches nothing;
        attention-level changes need the block's plain attention parts (not rotary or relative-bias attention).
        """
        changes = model.method.batched_changes(model.backbone)
        if len(self.adapter.classifier_modules()) > 1:
            return None
        if changes and self.geometry.kind != "vit":
            return None
        for change in changes or ():
            if change.kind in ("attention_logits", "qkv_low_rank"):
                try:
                    self.adapter.attention(change.block)
                except BackboneError:
                    return None
        return changes

    def _build(self, models: list[PromptModel]) -> None:
        rows = 1  # row 0: identity
        batched = []
        for task, model in zip(self.tasks, models, strict=True):
            task.head = copy.deepcopy(adapter_for(model.backbone).get_classifier())
            self.heads[task.name] = task.head
            changes = self._changes(model)
            if changes is None:
                task.model = model
                self.fallback[task.name] = model
                continue
            if changes:
                task.row = rows
                rows += 1
            batched.append((task, changes))
        self.num_rows = rows
        reference = next(self.backbone.parameters())
        factory = {"device": reference.device, "dtype": reference.dtype}
        #: table name -> stacked per-row tensor; table name -> rows that change something there
        tables: dict[str, torch.Tensor] = {}
        self._rows_of: dict[str, set[int]] = {}
        self.schedules: dict[tuple, dict[str, Any]] = {}

        def put(name: str, row: int, value: torch.Tensor, fill: float = 0.0) -> None:
            if name not in tables:
                tables[name] = torch.full((rows, *value.shape), fill, **factory)
            tables[name][row] = value
            self._rows_of.setdefault(name, set()).add(row)

        low_rank: dict[int, list[tuple[int, BatchedChange]]] = {}
        with torch.no_grad():
            for task, changes in batched:
                for change in changes:
                    kind, block, tensors = change.kind, change.block, change.tensors
                    if kind == "add_tokens":
                        put(f"add_{block}", task.row, tensors["delta"])
                    elif kind == "scale_tokens":
                        put(f"mul_{block}", task.row, tensors["delta"])
                    elif kind == "add_pixels":
                        put("frame", task.row, tensors["frame"])
                    elif kind == "attention_logits":
                        put(f"ept_lse_{block}", task.row, tensors["lse"], float("-inf"))
                        for name in ("bias", "temperature"):
                            if name in tensors:
                                put(f"ept_{name}_{block}", task.row, tensors[name])
                    elif kind == "qkv_low_rank":
                        low_rank.setdefault(block, []).append((task.row, change))
                    else:
                        self._add_schedule(task, change)
            for block, entries in low_rank.items():
                rank = max(change.tensors["a"].shape[1] for _, change in entries)
                parts, dim = entries[0][1].tensors["a"].shape[::2]
                part_size = entries[0][1].tensors["b"].shape[1]
                a = torch.zeros(rows, parts, rank, dim, **factory)
                b = torch.zeros(rows, parts, part_size, rank, **factory)
                for row, change in entries:
                    r = change.tensors["a"].shape[1]
                    a[row, :, :r] = change.tensors["a"]
                    b[row, :, :, :r] = change.tensors["b"]
                tables[f"lora_a_{block}"], tables[f"lora_b_{block}"] = a, b
                self._rows_of[f"lora_a_{block}"] = {row for row, _ in entries}
        for name, tensor in tables.items():
            self.tables.register_buffer(name, tensor)

    def _blocks_with(self, prefix: str, present: set[int] | None = None) -> set[int]:
        """Blocks with a table ``<prefix><block>`` (changed by a row in ``present``, when given)."""
        return {
            int(name[len(prefix) :])
            for name, rows in self._rows_of.items()
            if name.startswith(prefix)
            and name[len(prefix) :].isdigit()
            and (present is None or rows & present)
        }

    def _add_schedule(self, task: _Task, change: BatchedChange) -> None:
        schedule = dict(change.schedule)
        signature = (tuple(sorted(schedule.items())), change.prompts_at_norm, self.geometry.num_prefix_tokens)
        group = self.schedules.setdefault(
            signature, {"schedule": schedule, "prompts_at_norm": change.prompts_at_norm, "prompts": {}}
        )
        for block, prompts in change.tensors.items():
            group["prompts"].setdefault(int(block), {})[task.row] = prompts
        task.schedule = signature

    def _install_hooks(self) -> None:
        adapter = self.adapter
        if self.geometry.kind != "vit":
            return
        attention_blocks = self._blocks_with("ept_lse_") | self._blocks_with("lora_a_")
        for index, block in enumerate(adapter.blocks):
            if index in attention_blocks:
                parent, name = adapter.attention_slot(index)
                setattr(parent, name, _MultiTaskAttention(getattr(parent, name), index, self))
            block.register_forward_pre_hook(self._block_pre_hook(index))
        adapter.final_norm.register_forward_pre_hook(self._norm_pre_hook)
        if self.schedules:  # inserted prompt tokens: the family's position hooks (rotary, relative bias)
            self._position_hooks = Injections()
            adapter.prepare_inserted_tokens(self._position_hooks)
        if hasattr(self.tables, "frame"):
            adapter.input_module().register_forward_pre_hook(self._pixel_pre_hook)

    def _block_pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            ctx = self._context
            if ctx is None:
                return None
            x = args[0]
            if index in ctx.add_blocks:
                x = x + getattr(self.tables, f"add_{index}")[ctx.rows]
            if index in ctx.mul_blocks:
                x = x * (1 + getattr(self.tables, f"mul_{index}")[ctx.rows])
            if ctx.schedule is not None and index in ctx.schedule:
                num_old, length = ctx.schedule[index]
                prompts = ctx.insertion[index] if length else x.new_zeros(x.shape[0], 0, x.shape[-1])
                x = replace_prompts(x, prompts, self.geometry.num_prefix_tokens, num_old)
            return (x, *args[1:])

        return hook

    def _norm_pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        ctx = self._context
        if ctx is None or not ctx.prompts_at_norm:
            return None
        return (strip_prompts(args[0], self.geometry.num_prefix_tokens, ctx.prompts_at_norm), *args[1:])

    def _pixel_pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        ctx = self._context
        if ctx is None or not ctx.frame:
            return None
        return (args[0] + self.tables.frame[ctx.rows], *args[1:])

    # ------------------------------------------------------------------ forward

    def _task_index(self, task_ids: torch.Tensor | Sequence[int | str]) -> torch.Tensor:
        if isinstance(task_ids, torch.Tensor):
            return task_ids.long().cpu()
        lookup = {t.name: i for i, t in enumerate(self.tasks)}
        return torch.tensor([lookup[t] if isinstance(t, str) else int(t) for t in task_ids], dtype=torch.long)

    def _features(self, images: torch.Tensor, rows: torch.Tensor, signature: tuple | None) -> torch.Tensor:
        """Pre-logit features of ``images`` with per-sample table rows, one batched backbone forward."""
        ctx = _Context(rows=rows.to(images.device))
        present = set(rows.tolist())
        ctx.logit_blocks = self._blocks_with("ept_lse_", present)
        ctx.low_rank_blocks = self._blocks_with("lora_a_", present)
        ctx.add_blocks = self._blocks_with("add_", present)
        ctx.mul_blocks = self._blocks_with("mul_", present)
        ctx.frame = bool(self._rows_of.get("frame", set()) & present)
        if signature is not None:
            group = self.schedules[signature]
            ctx.schedule = group["schedule"]
            ctx.prompts_at_norm = group["prompts_at_norm"]
            ctx.insertion = {
                block: torch.stack([prompts[int(r)] for r in rows.tolist()]).to(images.device)
                for block, prompts in group["prompts"].items()
            }
        self._context = ctx
        try:
            return self.backbone(images)
        finally:
            self._context = None

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, task_ids: torch.Tensor | Sequence[int | str] | None = None
    ) -> dict[str, torch.Tensor]:
        batch = images.shape[0]
        if task_ids is None:
            pairs = [(i, t) for t in range(len(self.tasks)) for i in range(batch)]
        else:
            ids = self._task_index(task_ids)
            if ids.shape != (batch,):
                raise ValueError(
                    f"task_ids must have one entry per image ({batch}), got shape {tuple(ids.shape)}"
                )
            if len(ids) and (ids.min() < 0 or ids.max() >= len(self.tasks)):
                raise ValueError(f"task ids must be in 0..{len(self.tasks) - 1}")
            pairs = list(enumerate(ids.tolist()))
        outputs: dict[str, list[torch.Tensor]] = {}
        # Fallback tasks: their own model on their own samples.
        for t, task in enumerate(self.tasks):
            if task.model is not None:
                chosen = [i for i, tt in pairs if tt == t]
                if chosen:
                    outputs[task.name] = [task.model(images[chosen])]
        # Batched tasks, one backbone forward per insertion schedule; plain tasks share row 0 per image.
        groups: dict[tuple | None, list[tuple[int, int]]] = {}
        for i, t in pairs:
            task = self.tasks[t]
            if task.model is None:
                groups.setdefault(task.schedule, []).append((i, t))
        for signature, members in groups.items():
            keys: dict[tuple[int, int], int] = {}  # (image, row) -> position in the group batch
            order: list[tuple[int, int]] = []
            for i, t in members:
                key = (i, self.tasks[t].row)
                if key not in keys:
                    keys[key] = len(order)
                    order.append(key)
            index = torch.tensor([i for i, _ in order], dtype=torch.long, device=images.device)
            rows = torch.tensor([r for _, r in order], dtype=torch.long)
            features = self._features(images[index], rows, signature)
            by_task: dict[int, list[int]] = {}
            for i, t in members:
                by_task.setdefault(t, []).append(keys[(i, self.tasks[t].row)])
            for t, positions in by_task.items():
                task = self.tasks[t]
                outputs[task.name] = [task.head(features[positions])]
        return {t.name: outputs[t.name][0] for t in self.tasks if t.name in outputs}

    def logits_per_sample(
        self, images: torch.Tensor, task_ids: torch.Tensor | Sequence[int | str]
    ) -> list[torch.Tensor]:
        """One logits vector per image (its task's classes), in batch order."""
        ids = self._task_index(task_ids)
        grouped = self.forward(images, ids)
        cursor = {name: 0 for name in grouped}
        result = []
        for t in ids.tolist():
            name = self.tasks[t].name
            result.append(grouped[name][cursor[name]])
            cursor[name] += 1
        return result

    def probabilities(
        self,
        images: torch.Tensor,
        task_ids: torch.Tensor | Sequence[int | str] | None = None,
        *,
        calibrated: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``forward``'s logits as probabilities, calibrated with each artifact's stored calibration unless
        ``calibrated=False``; sigmoid for multi-label artifacts. Tasks given as PromptModels: plain softmax."""
        out = {}
        for name, logits in self.forward(images, task_ids).items():
            calibration, multilabel = self.calibrations.get(name, (None, False))
            if calibrated and calibration is not None:
                out[name] = calibration.probabilities(logits)
            else:
                out[name] = scores_from_logits(logits, multilabel)
        return out

    def named_tasks(self) -> Iterator[tuple[str, str]]:
        """(task name, method name) pairs, in task order."""
        return ((t.name, t.method) for t in self.tasks)


def _stored_calibration(directory: str | Path) -> Any:
    from promptvit.artifact import read_artifact_config
    from promptvit.evaluation.calibration import artifact_calibration
    from promptvit.hub import local_folder

    directory = local_folder(directory)
    info = read_artifact_config(directory)
    return artifact_calibration(info, directory), bool(info.get("multilabel"))
