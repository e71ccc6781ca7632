"""The L-BFGS linear probe against scikit-learn's LogisticRegression on the same features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import TensorDataset

import promptvit
from promptvit.train import TrainConfig, fit
from promptvit.train.probe import extract_features, fit_lbfgs_probe, fit_logistic
from tests.conftest import build_tiny


def _blobs(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    y = torch.arange(n) % classes
    return centres[y] + 1.5 * torch.randn(n, dim, generator=g, dtype=torch.float64), y


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_fit_logistic_matches_scikit_learn(l2: float) -> None:
    x, y = _blobs(90, 12, 4, seed=0)  # overlapping classes: the L2 term matters
    x_test, _ = _blobs(200, 12, 4, seed=1)
    weight, bias = fit_logistic(x, y, 4, l2)
    # sklearn minimises C * sum(CE) + ||W||^2 / 2 (intercept unpenalised): the same optimum at C = 1 / (l2 n)
    reference = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())
    ours = (x_test @ weight.T + bias).numpy()
    theirs = reference.decision_function(x_test.numpy())
    np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))
    # logits are defined up to a per-row constant (softmax); compare them centred
    centred = lambda z: z - z.mean(axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(centred(ours), centred(theirs), atol=1e-3)


def test_linear_solver_lbfgs_trains_the_head_to_convergence_in_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = promptvit.wrap(
        build_tiny("vit_token", num_classes=3), "linear", solver="lbfgs", l2_grid=[1e-2, 1e-4]
    )
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(24) % 3
    images += labels[:, None, None, None].float()  # learnable
    train, val = TensorDataset(images[:18], labels[:18]), TensorDataset(images[18:], labels[18:])
    config = TrainConfig(epochs=5, device="cpu", progress=False)
    result = fit(
        model, train, val, config=config, run_dir=tmp_path, class_names=["a", "b", "c"], multilabel=False
    )
    features, targets = extract_features(model, train, batch_size=64, device=torch.device("cpu"))
    l2 = result.history[0]["probe_l2"]
    assert l2 in (1e-2, 1e-4)
    weight, bias = fit_logistic(features, targets, 3, l2)
    head = model.get_classifier()
    torch.testing.assert_close(head.weight.double(), weight, rtol=0, atol=1e-4)
    torch.testing.assert_close(head.bias.double(), bias, rtol=0, atol=1e-4)
    assert (tmp_path / "artifact").is_dir() and len(result.history) == 1


def test_mlp_head_is_fitted_by_lbfgs_on_the_cached_features(tmp_path: Path) -> None:
    model = promptvit.wrap(
        build_tiny("vit_token", num_classes=3), "mlp", num_layers=2, solver="lbfgs", l2_grid=[1e-4]
    )
    images = torch.randn(18, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(18) % 3
    train = TensorDataset(images, labels)  # random images: only a fitted MLP separates them
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    config = TrainConfig(epochs=3, device="cpu", progress=False)
    fit(model, train, None, config=config, run_dir=tmp_path, class_names=["a", "b", "c"], multilabel=False)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    features, targets = extract_features(model, train, batch_size=64, device=torch.device("cpu"))
    with torch.no_grad():
        logits = model.eval()(images)
    assert (logits.argmax(1) == labels).all()  # fitted to convergence on 18 points in 32 dimensions
    assert features.shape == (18, 32)


def test_l2_ties_on_the_metric_go_to_the_lower_val_loss() -> None:
    """All strengths classify the separable val set perfectly; the weakest L2 has the lowest val loss."""
    model = promptvit.wrap(build_tiny("vit_token", num_classes=2), "linear", solver="lbfgs")
    images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 2
    images += 3 * labels[:, None, None, None].float()  # far apart: every strength gets 100 % val accuracy
    train, val = TensorDataset(images[:12], labels[:12]), TensorDataset(images[12:], labels[12:])
    result = fit_lbfgs_probe(
        model,
        train,
        val,
        multilabel=False,
        select="accuracy",
        class_names=["a", "b"],
        device=torch.device("cpu"),
        l2_grid=[10.0, 1e-3],
    )
    assert [metric for _, metric in result.path] == [100.0, 100.0]
    assert result.l2 == 1e-3
