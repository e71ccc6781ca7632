"""Batched multi-task inference: many saved artifacts of one backbone served by one batched forward.

``MultiTaskModel(base_backbone, [artifact dirs or PromptModels])`` keeps ONE frozen copy of the backbone
and, per task, only what the task tunes. A batch of images with task ids (or every task for every image)
runs through the shared backbone once; where the tasks' methods differ, each sample uses its own task's
tensors, gathered per sample:

* ``linear`` / ``mlp``: nothing changes in the backbone ("plain" tasks); all plain tasks of an image share
  one backbone pass, then each task's head runs on the shared pre-logit features;
* ``vp``: the token prompt (added at the input of block 0) or the pixel frame (added to the image), per sample;
* ``ap`` add/product: the activation prompt at the input of block ``layer``, per sample;
* ``ept`` (``pure_cat``, ``add``, ``multiply``): the prompted attention of each prompted block with the
  sample's prompt logits (one padded key holding ``LSE_k P_ik``; ``-inf`` for samples whose task has no
  prompt there), logit bias or query temperature;
* ``lora`` (unmerged): per block, every task's factors padded to a common rank on all three q/k/v parts
  (zeros where a task has none) with ``alpha / r`` folded into B, gathered per sample; samples of tasks
  without LoRA add exact zeros;
* token prompts (``vpt``, ``spt``, ``ap`` concat): samples are grouped by insertion schedule (blocks and
  lengths); within a group every sample gets its task's prompts.

Every other case falls back to a per-task forward of the task's own ``PromptModel`` on its samples: methods
that change backbone weights (``bias``, ``norm``, ``partial``, ``full``), ``adapter``, EPT ``multi_cat``,
``da_vpt``, and any method on a CNN backbone other than ``linear``/``mlp``. ``batched_tasks`` and
``fallback_tasks`` list the split.

Results equal per-task inference up to float rounding (the batched attention of a block where some sample
has EPT runs the masked SDPA path for every sample of the batch, and LoRA deltas are computed with the
scaling folded into B); the tests hold them to 1e-5 in float32.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptvit.backbones import classifier_name, geometry_of, set_classifier, weights_fingerprint
from promptvit.layers.lora import FusedLoRALinear
from promptvit.layers.prompted_attention import PromptedAttention
from promptvit.layers.token_prompts import replace_prompts, strip_prompts
from promptvit.methods.base import ConfigError
from promptvit.model import PromptModel

PLAIN_METHODS = ("linear", "mlp")
TOKEN_PROMPT_METHODS = ("vpt", "spt")
_REQUIRED_ATTN = ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")


def _body_fingerprint(backbone: nn.Module) -> str:
    head = classifier_name(backbone)
    return weights_fingerprint({n: p for n, p in backbone.named_parameters() if not n.startswith(head + ".")})


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
    ept_blocks: set[int] = field(default_factory=set)
    lora_blocks: set[int] = field(default_factory=set)
    add_blocks: set[int] = field(default_factory=set)
    mul_blocks: set[int] = field(default_factory=set)
    frame: bool = False
    insertion: dict[int, torch.Tensor] | None = None  # block -> (B, L, d) prompts
    schedule: dict[int, tuple[int, int]] | None = None
    prompts_at_norm: int = 0


class _Tables(nn.Module):
    """Per-task tensors stacked by table row; row 0 is the identity (no change)."""


class _MultiTaskAttention(nn.Module):
    """A frozen timm ``Attention`` plus per-sample EPT logits and LoRA deltas from the owner's tables."""

    def __init__(self, base: nn.Module, block: int, owner: MultiTaskModel) -> None:
        super().__init__()
        missing = [n for n in _REQUIRED_ATTN if not hasattr(base, n)]
        if missing:
            raise ConfigError(
                f"serving: block {block}'s attention lacks {missing}; only timm fused-qkv attention"
            )
        self.base_layer = base
        self.block = block
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        owner = self._owner[0]
        ctx = owner._context
        ept = ctx is not None and self.block in ctx.ept_blocks
        lora = ctx is not None and self.block in ctx.lora_blocks
        if not (ept or lora):
            return self.base_layer(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("multi-task attention does not support attention masks")
        base = self.base_layer
        tables = owner.tables
        rows = ctx.rows
        batch, n, _ = x.shape
        gate = base.gate(x).sigmoid() if getattr(base, "gate", None) is not None else None
        qkv = base.qkv(x)
        if lora:
            a = getattr(tables, f"lora_a_{self.block}")[rows]  # (B, 3, R, D)
            b = getattr(tables, f"lora_b_{self.block}")[rows]  # (B, 3, P, R), scaling folded in
            h = torch.einsum("bnd,bprd->bnpr", x, a)
            qkv = qkv + torch.einsum("bnpr,bpor->bnpo", h, b).flatten(-2)
        qkv = qkv.reshape(batch, n, 3, base.num_heads, base.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = base.q_norm(q), base.k_norm(k)
        scale = getattr(base, "scale", None)
        if scale is not None and scale == q.shape[-1] ** -0.5:
            scale = None
        if ept:
            out = self._ept(q, k, v, rows, n, scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out = out.transpose(1, 2).reshape(batch, n, getattr(base, "attn_dim", base.num_heads * base.head_dim))
        norm = getattr(base, "norm", None)
        if norm is not None:
            out = norm(out)
        if gate is not None:
            out = out * gate
        return base.proj_drop(base.proj(out))

    def _ept(self, q, k, v, rows, n, scale):
        tables = self._owner[0].tables
        temperature = getattr(tables, f"ept_temperature_{self.block}", None)
        if temperature is not None:
            q = q * (1 + temperature[rows]).unsqueeze(1).to(q.dtype)  # (B, 1, N, 1)
        lse = getattr(tables, f"ept_lse_{self.block}")[rows]  # (B, N), -inf: no prompt
        bias = getattr(tables, f"ept_bias_{self.block}", None)
        if lse.shape[-1] != n:
            raise ValueError(f"EPT prompts have {lse.shape[-1]} rows but block {self.block} got {n} tokens")
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
        self.geometry = geometry_of(base_backbone)
        fingerprint = _body_fingerprint(base_backbone)
        backbone = copy.deepcopy(base_backbone).eval().requires_grad_(False)
        set_classifier(backbone, nn.Identity())
        self.backbone = backbone
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

    def _batchable(self, model: PromptModel) -> bool:
        method = model.method
        if method.name in PLAIN_METHODS:
            return True
        if self.geometry.kind != "vit":
            return False
        if method.name in ("vp", "lora") or method.name in TOKEN_PROMPT_METHODS:
            return True
        if method.name == "ap":
            return True
        if method.name == "ept":
            return method.config.way != "multi_cat"
        return False

    def _build(self, models: list[PromptModel]) -> None:
        depth = self.geometry.depth if self.geometry.kind == "vit" else 0
        rows = 1  # row 0: identity
        batched = []
        for task, model in zip(self.tasks, models, strict=True):
            task.head = copy.deepcopy(model.backbone.get_classifier())
            self.heads[task.name] = task.head
            if not self._batchable(model):
                task.model = model
                self.fallback[task.name] = model
                continue
            if model.method.name not in PLAIN_METHODS:
                task.row = rows
                rows += 1
            batched.append((task, model))
        self.num_rows = rows
        adds: dict[int, torch.Tensor] = {}
        muls: dict[int, torch.Tensor] = {}
        frames: torch.Tensor | None = None
        ept: dict[int, dict[str, Any]] = {}
        ept_rows: dict[int, set[int]] = {}
        lora: dict[int, list[tuple[int, FusedLoRALinear]]] = {}
        self.schedules: dict[tuple, dict[str, Any]] = {}
        reference = next(self.backbone.parameters())
        factory = {"device": reference.device, "dtype": reference.dtype}
        n, d = self.geometry.num_tokens, self.geometry.embed_dim

        add_rows: dict[int, set[int]] = {}
        mul_rows: dict[int, set[int]] = {}
        frame_rows: set[int] = set()

        def table(store: dict, key: int, shape: tuple, fill: float = 0.0) -> torch.Tensor:
            if key not in store:
                store[key] = torch.full((rows, *shape), fill, **factory)
            return store[key]

        for task, model in batched:
            method, name = model.method, model.method.name
            if name in PLAIN_METHODS:
                continue
            with torch.no_grad():
                if name == "vp" and method.config.mode == "token":
                    table(adds, 0, (n, d))[task.row] = method.prompt
                    add_rows.setdefault(0, set()).add(task.row)
                elif name == "vp":
                    frame = method.frame()
                    if frames is None:
                        frames = torch.zeros((rows, *frame.shape), **factory)
                    frames[task.row] = frame
                    frame_rows.add(task.row)
                elif name == "ap" and method.config.variant == "add":
                    table(adds, method.config.layer, (n, d))[task.row] = method.delta
                    add_rows.setdefault(method.config.layer, set()).add(task.row)
                elif name == "ap" and method.config.variant == "product":
                    table(muls, method.config.layer, (n, d))[task.row] = method.delta
                    mul_rows.setdefault(method.config.layer, set()).add(task.row)
                elif name == "ept":
                    for block in range(depth):
                        layer = model.backbone.blocks[block].attn
                        if not isinstance(layer, PromptedAttention):
                            continue
                        entry = ept.setdefault(block, {})
                        ept_rows.setdefault(block, set()).add(task.row)
                        if layer.way == "pure_cat":
                            table(entry, "lse", (n,), float("-inf"))[task.row] = torch.logsumexp(
                                layer.prompt, -1
                            )
                        elif layer.way == "add":
                            table(entry, "lse", (n,), float("-inf"))
                            table(entry, "bias", (n, n))[task.row] = layer.logit_bias
                        else:
                            table(entry, "lse", (n,), float("-inf"))
                            table(entry, "temperature", (n, 1))[task.row] = layer.temperature
                elif name == "lora":
                    for block in range(depth):
                        layer = model.backbone.blocks[block].attn.qkv
                        if isinstance(layer, FusedLoRALinear):
                            lora.setdefault(block, []).append((task.row, layer))
                else:  # token prompts: vpt, spt, ap concat
                    self._add_schedule(task, method)
        for block, tensor in adds.items():
            self.tables.register_buffer(f"add_{block}", tensor)
        for block, tensor in muls.items():
            self.tables.register_buffer(f"mul_{block}", tensor)
        if frames is not None:
            self.tables.register_buffer("frame", frames)
        for block, entry in ept.items():
            for key, tensor in entry.items():
                self.tables.register_buffer(f"ept_{key}_{block}", tensor)
        for block, layers in lora.items():
            rank = max(layer.rank for _, layer in layers)
            part = layers[0][1].part_size
            a = torch.zeros(rows, 3, rank, d, **factory)
            b = torch.zeros(rows, 3, part, rank, **factory)
            with torch.no_grad():
                for row, layer in layers:
                    for i, p in enumerate(layer.parts):
                        a[row, p, : layer.rank] = layer.lora_A[i]
                        b[row, p, :, : layer.rank] = layer.lora_B[i] * layer.scaling
            self.tables.register_buffer(f"lora_a_{block}", a)
            self.tables.register_buffer(f"lora_b_{block}", b)
        #: block -> table rows (tasks) that change that block's attention
        self._ept_rows = ept_rows
        self._add_rows, self._mul_rows, self._frame_rows = add_rows, mul_rows, frame_rows
        self._lora_rows = {block: {row for row, _ in layers} for block, layers in lora.items()}

    def _add_schedule(self, task: _Task, method: nn.Module) -> None:
        schedule = dict(method.prompt_schedule)
        signature = (tuple(sorted(schedule.items())), method.prompts_at_norm, method.num_prefix_tokens)
        group = self.schedules.setdefault(
            signature,
            {"schedule": schedule, "prompts_at_norm": method.prompts_at_norm, "prompts": {}},
        )
        probe = torch.zeros(1, self.geometry.num_tokens, self.geometry.embed_dim)
        with torch.no_grad():
            for block, (_, length) in schedule.items():
                if length:
                    prompts = method.block_prompts(block, probe.to(next(method.parameters()).device))
                    group["prompts"].setdefault(block, {})[task.row] = prompts[0].detach().clone()
        task.schedule = signature

    def _install_hooks(self) -> None:
        backbone = self.backbone
        if self.geometry.kind != "vit":
            return
        for index, block in enumerate(backbone.blocks):
            if index in self._ept_rows or index in self._lora_rows:
                block.attn = _MultiTaskAttention(block.attn, index, self)
            block.register_forward_pre_hook(self._block_pre_hook(index))
        backbone.norm.register_forward_pre_hook(self._norm_pre_hook)
        if hasattr(self.tables, "frame"):
            backbone.patch_embed.register_forward_pre_hook(self._pixel_pre_hook)

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
        ctx.ept_blocks = {b for b, r in self._ept_rows.items() if r & present}
        ctx.lora_blocks = {b for b, r in self._lora_rows.items() if r & present}
        ctx.add_blocks = {b for b, r in self._add_rows.items() if r & present}
        ctx.mul_blocks = {b for b, r in self._mul_rows.items() if r & present}
        ctx.frame = bool(self._frame_rows & present)
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
                out[name] = logits.sigmoid() if multilabel else logits.softmax(-1)
        return out

    def named_tasks(self) -> Iterator[tuple[str, str]]:
        """(task name, method name) pairs, in task order."""
        return ((t.name, t.method) for t in self.tasks)


def _stored_calibration(directory: str | Path) -> Any:
    from promptvit.artifact import read_artifact_config
    from promptvit.train.clinical import artifact_calibration

    info = read_artifact_config(directory)
    return artifact_calibration(info, directory), bool(info.get("multilabel"))
