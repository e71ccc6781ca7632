"""`log_nmi`: the prompt/patch NMI of every prompted block lands in log.csv after each epoch.

The NMI logger is a ``fit`` callback built above the engine (the run pipeline attaches it); calling ``fit``
directly, the caller passes it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import promptvit
from promptvit.analysis.nmi import layer_nmi
from promptvit.analysis_callbacks import NMILogger
from promptvit.errors import ConfigError
from promptvit.train import fit
from tests.conftest import build_tiny


def _data(n: int = 8) -> torch.utils.data.TensorDataset:
    images = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(images, torch.arange(n) % 2)


def _fit(method: str, tmp_path: Path, **options):
    model = promptvit.wrap(build_tiny("vit_token"), method, num_classes=2, **options)
    config = {"epochs": 2, "lr": 0.05, "progress": False, "log_nmi": True}
    result = fit(
        model,
        _data(),
        _data(4),
        config=config,
        run_dir=tmp_path,
        multilabel=False,
        class_names=["a", "b"],
        callbacks=[NMILogger()],
    )
    with open(tmp_path / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, model, result.best_epoch


def test_nmi_per_prompted_block_is_logged_each_epoch(tmp_path: Path) -> None:
    rows, model, best_epoch = _fit("vpt", tmp_path, prompt_length=2)
    assert len(rows) == 2 and {"nmi_block0", "nmi_block1"} <= set(rows[0])
    # The model ends in its selected epoch's state: that row's NMI is recomputed on the fixed batch
    # (the first 4 validation images).
    expected = layer_nmi(model, _data(4).tensors[0])["mean"]
    assert abs(float(rows[best_epoch - 1]["nmi_block1"]) - expected[1]) < 1e-6


def test_methods_without_prompt_tokens_log_no_nmi(tmp_path: Path) -> None:
    rows, _, _ = _fit("linear", tmp_path)
    assert not any(key.startswith("nmi_") for key in rows[0])


def test_log_nmi_without_its_callback_is_refused(tmp_path: Path) -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "vpt", num_classes=2, prompt_length=2)
    config = {"epochs": 1, "progress": False, "log_nmi": True}
    with pytest.raises(ConfigError, match="log_nmi"):
        fit(model, _data(), None, config=config, run_dir=tmp_path, multilabel=False, class_names=["a", "b"])
    assert not (tmp_path / "log.csv").exists()
