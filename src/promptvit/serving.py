"""Batched multi-task inference: many saved artifacts of one backbone served as named adapters of one model.

``MultiTaskModel(base_backbone, [artifact dirs or PromptModels])`` wraps the backbone once and loads every
task as a named adapter of that :class:`~promptvit.model.PromptModel` (its tuned tensors and its head; the
backbone is not copied). A batch of images with task ids (or every task for every image) is answered with
mixed batches (``PromptModel.forward_adapters``): each tuner layer applies each task's tensors to that task's
samples, so tasks share forwards where their methods allow (every task that inserts no prompt tokens shares
one, tasks of one prompt-token layout another) and run in a forward of their own where they do not (tasks
that tune backbone weights in place). Tasks that change only the head share one forward per image.

Nothing here knows a method: what shares a forward is decided by the model from what each method declares.
Results equal per-task inference up to float rounding; the tests hold them to 1e-5 in float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptvit.artifact_format import load_tuned_state, read_artifact, read_artifact_config
from promptvit.backbones import adapter_for, body_parameters, weights_fingerprint
from promptvit.evaluation.probability import scores_from_logits
from promptvit.hub import local_folder
from promptvit.methods.base import ConfigError
from promptvit.model import PromptModel, check_artifact_fits, method_config, wrap


class MultiTaskModel(nn.Module):
    """Serve several tasks (artifacts or wrapped models) of ONE backbone as named adapters of one model.

    Args:
        base_backbone: the plain timm backbone every task was trained on. It is wrapped in place (not
            copied): ``served.model.unload()`` gives it back.
        tasks: artifact folders (or Hub addresses) or ``PromptModel``s on that backbone.
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
        geometry = adapter_for(base_backbone).geometry()
        fingerprint = weights_fingerprint(body_parameters(base_backbone))
        self.task_names: list[str] = []
        #: task name -> (stored Calibration or None, multilabel), for artifact tasks
        self.calibrations: dict[str, Any] = {}
        self.model: PromptModel | None = None
        try:
            self._add_tasks(base_backbone, tasks, names, geometry, fingerprint, check_weights)
        except Exception:
            if self.model is not None:  # the backbone comes back as it was given
                self.model.unload()
            raise
        self.model.eval()

    def _add_tasks(
        self,
        base: nn.Module,
        tasks: Sequence[str | Path | PromptModel],
        names: Sequence[str] | None,
        geometry: Any,
        fingerprint: str,
        check_weights: bool,
    ) -> None:
        for index, task in enumerate(tasks):
            name = names[index] if names is not None else None
            if isinstance(task, PromptModel):
                name = name or f"task{index}"
                if check_weights and task.base_fingerprint != fingerprint:
                    raise ConfigError(
                        f"task {index} was trained on other backbone weights (fingerprint {task.base_fingerprint} "
                        f"vs {fingerprint}); pass check_weights=False to override"
                    )
                if task.geometry != geometry:
                    raise ConfigError(f"task '{name}' was built for another backbone geometry")
            else:
                name = name or Path(str(task)).name
            if name in self.task_names:
                raise ValueError(f"duplicate task name '{name}'")
            self._add_task(base, task, self._adapter(index), geometry, fingerprint, check_weights)
            self.task_names.append(name)
            if not isinstance(task, PromptModel):
                self.calibrations[name] = _stored_calibration(local_folder(task))

    def _add_task(
        self,
        base: nn.Module,
        task: str | Path | PromptModel,
        adapter: str,
        geometry: Any,
        fingerprint: str,
        check_weights: bool,
    ) -> None:
        """Load ``task`` as the adapter ``adapter`` (the first one wraps the base backbone)."""
        if isinstance(task, PromptModel):
            config, num_classes, state, source = (
                task.config,
                task.num_classes,
                task.tuned_state_dict(),
                f"task '{adapter}'",
            )
        elif self.model is not None:
            self.model.load_adapter(task, adapter, check_weights=check_weights)
            return
        else:
            directory, info, weights_path, state = read_artifact(local_folder(task))
            check_artifact_fits(directory, info, geometry, fingerprint, check_weights)
            config, num_classes, source = method_config(info), info["num_classes"], str(weights_path)
        if self.model is None:
            self.model = wrap(base, config, num_classes=num_classes, adapter_name=adapter)
        else:
            self.model.add_adapter(adapter, config, num_classes=num_classes)
        with torch.no_grad():
            load_tuned_state(self.model, state, source, adapter_name=adapter)

    # ------------------------------------------------------------------ the tasks

    def _adapter(self, task: int) -> str:
        return f"task{task}"

    @property
    def grouped_tasks(self) -> list[str]:
        """Tasks that run in a forward of their own (their methods tune backbone weights in place)."""
        return [name for i, name in enumerate(self.task_names) if self.model.runs_alone(self._adapter(i))]

    @property
    def batched_tasks(self) -> list[str]:
        """Tasks whose samples share forwards with other tasks' samples."""
        grouped = set(self.grouped_tasks)
        return [name for name in self.task_names if name not in grouped]

    def named_tasks(self) -> Iterator[tuple[str, str]]:
        """(task name, method name) pairs, in task order."""
        return ((name, self.model.adapters[self._adapter(i)].name) for i, name in enumerate(self.task_names))

    def _task_index(self, task_ids: torch.Tensor | Sequence[int | str]) -> torch.Tensor:
        if isinstance(task_ids, torch.Tensor):
            return task_ids.long().cpu()
        lookup = {name: i for i, name in enumerate(self.task_names)}
        return torch.tensor([lookup[t] if isinstance(t, str) else int(t) for t in task_ids], dtype=torch.long)

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, task_ids: torch.Tensor | Sequence[int | str] | None = None
    ) -> dict[str, torch.Tensor]:
        batch = images.shape[0]
        if task_ids is None:
            logits = self.model.forward_every_adapter(
                images, [self._adapter(i) for i in range(len(self.task_names))]
            )
            return {name: logits[self._adapter(i)] for i, name in enumerate(self.task_names)}
        ids = self._task_index(task_ids)
        if ids.shape != (batch,):
            raise ValueError(
                f"task_ids must have one entry per image ({batch}), got shape {tuple(ids.shape)}"
            )
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.task_names)):
            raise ValueError(f"task ids must be in 0..{len(self.task_names) - 1}")
        logits = self.model.forward_adapters(images, [self._adapter(t) for t in ids.tolist()])
        return {
            name: logits[self._adapter(i)]
            for i, name in enumerate(self.task_names)
            if self._adapter(i) in logits
        }

    def logits_per_sample(
        self, images: torch.Tensor, task_ids: torch.Tensor | Sequence[int | str]
    ) -> list[torch.Tensor]:
        """One logits vector per image (its task's classes), in batch order."""
        ids = self._task_index(task_ids)
        grouped = self.forward(images, ids)
        cursor = {name: 0 for name in grouped}
        result = []
        for t in ids.tolist():
            name = self.task_names[t]
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


def _stored_calibration(directory: str | Path) -> Any:
    from promptvit.evaluation.calibration import artifact_calibration
    from promptvit.hub import local_folder

    directory = local_folder(directory)
    info = read_artifact_config(directory)
    return artifact_calibration(info, directory), bool(info.get("multilabel"))
