"""Shared test setup and helpers on wrapped models (the tiny builds themselves are in tests/families.py)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Two cores: one torch thread per test process keeps OpenMP from spinning against a parallel worker.
torch.set_num_threads(int(os.environ.get("PROMPTVIT_TEST_THREADS", "1")))
# `promptvit methods` keeps its rows in a cache folder: never the user's own during tests.
os.environ.setdefault("PROMPTVIT_CACHE_DIR", tempfile.mkdtemp(prefix="promptvit-test-cache-"))


def logits_and_grads(model, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of ``model(x)`` and the gradient of every tuned tensor for the loss ``sum(logits ** 2)``."""
    model.zero_grad()
    logits = model(x)
    logits.square().sum().backward()
    return logits.detach(), [p.grad.clone() for _, p in model.tuned_named_parameters()]


def raw_names(model, parameters) -> set[str]:
    """State-dict names of ``parameters`` in ``model`` (with adapter containers, unlike artifact keys)."""
    ids = {id(p) for p in parameters}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def original_head_ids(model) -> set[int]:
    """ids of the backbone's own classifier parameters: kept frozen inside the heads' slots while wrapped."""
    from promptvit.backbones import unwrap_base_layers

    heads = [unwrap_base_layers(getattr(parent, name)) for parent, name in model.adapter.classifier_slots()]
    return {id(p) for head in heads for p in head.parameters()}


def without_readout(model):
    """The wrapped model with its class-token readout off, for bit-exact comparisons with timm's forward.

    The readout (the last block computes the class-token row only) agrees up to float rounding; it is pinned
    for every method in tests/methods/test_matrix.py.
    """
    model.plan.class_token_readout = False
    return model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The timm registry sweep takes minutes: it runs only when its marker is selected (``-m registry``)."""
    if "registry" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="the timm registry sweep runs with -m registry (as CI does)")
    for item in items:
        if "registry" in item.keywords:
            item.add_marker(skip)
