"""Training callbacks that measure with analysis code: above both the engine and ``promptvit.analysis``,
which do not import each other. The run pipeline attaches the ones its config asks for (``config_flag``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from promptvit.model import PromptModel
from promptvit.train import Callback


class NMILogger(Callback):
    """``train.log_nmi``: after every epoch, the prompt/patch NMI of each prompted block (``analysis.nmi``)
    on a fixed batch of up to ``count`` validation (else training) images, as ``nmi_block<i>`` columns.

    Blocks without prompt tokens are left out, so methods without prompts log nothing.
    """

    config_flag = "log_nmi"

    def __init__(self, count: int = 32) -> None:
        self.count = count
        self.images: torch.Tensor | None = None

    def on_fit_start(self, model: PromptModel, train_set: Dataset, val_set: Dataset | None) -> None:
        data = val_set if val_set is not None else train_set
        if len(data):
            self.images = next(iter(DataLoader(data, batch_size=self.count, shuffle=False)))[0]

    def on_epoch_end(self, model: PromptModel, epoch: int) -> dict[str, Any]:
        if self.images is None or model.geometry.kind != "vit":
            return {}
        from promptvit.analysis.nmi import layer_nmi  # here: the analysis package imports matplotlib

        means = layer_nmi(model, self.images)["mean"]
        return {f"nmi_block{index}": float(value) for index, value in enumerate(means) if value is not None}
