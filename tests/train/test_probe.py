"""The L-BFGS linear probe against scikit-learn's LogisticRegression on the same features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import TensorDataset

import promptvit
from promptvit.cache import PrefixCache
from promptvit.train import TrainConfig, fit
from promptvit.train.probe import (
    DEFAULT_L2_GRID,
    MIN_VAL_PER_CLASS_TO_CHOOSE,
    extract_features,
    fit_lbfgs_probe,
    fit_logistic,
    sklearn_l2,
)
from tests.families import build_tiny


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
    w, b = head.weight.detach().double(), head.bias.detach().double()

    def objective(weight: torch.Tensor, bias: torch.Tensor) -> float:
        logits = features @ weight.T + bias
        return float(torch.nn.functional.cross_entropy(logits, targets) + 0.5 * l2 * weight.pow(2).sum())

    # Near the optimum the objective is flat along some directions (the unpenalised biases on nearly separable
    # features), where L-BFGS stops anywhere within its tolerances: compare the objective and the logits.
    assert objective(w, b) == pytest.approx(objective(weight, bias), rel=1e-7, abs=0)
    centred = lambda z: z - z.mean(dim=1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(
        centred(features @ w.T + b), centred(features @ weight.T + bias), rtol=0, atol=1e-3
    )
    torch.testing.assert_close(w, weight, rtol=0, atol=1e-3)
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


@pytest.mark.parametrize("classes", [2, 3])
def test_default_linear_probe_equals_scikit_learn_c1(classes: int, tmp_path: Path) -> None:
    """No solver, no grid, a small val set: `linear` is scikit-learn's LogisticRegression(C=1) on the features."""
    model = promptvit.wrap(build_tiny("vit_token", num_classes=classes), "linear")
    assert model.method.fits_head_to_convergence()
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(60) % classes
    images = torch.randn(60, 3, 16, 16, generator=g) + 0.4 * labels[:, None, None, None].float()
    train, val = TensorDataset(images[:30], labels[:30]), TensorDataset(images[30:36], labels[30:36])
    config = TrainConfig(epochs=3, device="cpu", progress=False)
    names = [f"c{i}" for i in range(classes)]
    result = fit(model, train, val, config=config, run_dir=tmp_path, class_names=names, multilabel=False)
    assert "C = 1" in result.history[0]["probe_l2_rule"]
    features, targets = extract_features(model, train, batch_size=64, device=torch.device("cpu"))
    test_features, _ = extract_features(
        model, TensorDataset(images[36:], labels[36:]), batch_size=64, device=torch.device("cpu")
    )
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(features.numpy(), targets.numpy())
    with torch.no_grad():
        ours = model.eval()(images[36:]).argmax(1).numpy()
    np.testing.assert_array_equal(ours, reference.predict(test_features.numpy()))
    # the same optimum, not only the same decisions: the probabilities agree
    with torch.no_grad():
        probs = torch.softmax(model(images[36:]).double(), 1).numpy()
    np.testing.assert_allclose(probs, reference.predict_proba(test_features.numpy()), atol=1e-4)


def test_the_l2_strength_is_chosen_on_val_only_when_val_is_large_enough() -> None:
    model = promptvit.wrap(build_tiny("vit_token", num_classes=2), "linear")
    labels = torch.arange(40 + 2 * MIN_VAL_PER_CLASS_TO_CHOOSE) % 2
    images = torch.randn(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(2))
    images += 0.5 * labels[:, None, None, None].float()
    train, val = TensorDataset(images[:40], labels[:40]), TensorDataset(images[40:], labels[40:])
    kwargs = {
        "multilabel": False,
        "select": "accuracy",
        "class_names": ["a", "b"],
        "device": torch.device("cpu"),
    }
    small = fit_lbfgs_probe(model, train, TensorDataset(images[40:60], labels[40:60]), **kwargs)
    assert small.l2 == sklearn_l2(40, 2, False) == 2 / 40 and "fewer than" in small.rule
    assert [l2 for l2, _ in small.path] == [2 / 40]
    large = fit_lbfgs_probe(model, train, val, **kwargs)
    assert len(large.path) == len(DEFAULT_L2_GRID) and "chosen on val" in large.rule
    alone = fit_lbfgs_probe(model, train, None, **kwargs)
    assert alone.l2 == 2 / 40 and "no validation set" in alone.rule


def test_non_finite_features_stop_the_probe(tmp_path: Path) -> None:
    from promptvit.train import TrainingError

    model = promptvit.wrap(build_tiny("vit_token", num_classes=2), "linear")
    data = TensorDataset(torch.full((4, 3, 16, 16), float("nan")), torch.tensor([0, 1, 0, 1]))
    config = TrainConfig(epochs=1, device="cpu", progress=False)
    with pytest.raises(TrainingError, match="NaN/inf"):
        fit(model, data, None, config=config, run_dir=tmp_path, class_names=["a", "b"], multilabel=False)
    assert not (tmp_path / "artifact").exists()


def test_the_probe_fits_the_active_adapters_head_only() -> None:
    """With several adapters on the backbone, the probe fits the active one's head and leaves the others'."""
    model = promptvit.wrap(build_tiny("vit_token", num_classes=3), "linear", num_classes=3)
    model.add_adapter("other", "linear", num_classes=3)
    other = {n: t.clone() for n, t in model.tuned_state_dict("other").items()}
    images = torch.randn(18, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(18) % 3
    images += labels[:, None, None, None].float()
    train = TensorDataset(images, labels)
    cpu = torch.device("cpu")
    fit_lbfgs_probe(
        model, train, None, multilabel=False, select="accuracy", class_names=["a", "b", "c"], device=cpu
    )
    features, targets = extract_features(model, train, batch_size=64, device=torch.device("cpu"))
    weight, bias = fit_logistic(features, targets, 3, sklearn_l2(len(targets), 3, False))
    torch.testing.assert_close(model.get_classifier().weight.double(), weight, rtol=0, atol=1e-4)
    assert all(torch.equal(t, other[n]) for n, t in model.tuned_state_dict("other").items())


def test_the_probe_reads_and_fills_a_shared_prefix_cache(tmp_path: Path) -> None:
    """A probe on cached features equals one without; a second run on the same cache computes nothing."""
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(24) % 3
    images += labels[:, None, None, None].float()
    train, val = TensorDataset(images[:18], labels[:18]), TensorDataset(images[18:], labels[18:])
    cache = PrefixCache(tmp_path / "cache")

    def probe(run: str, cached: bool) -> torch.nn.Module:
        model = promptvit.wrap(build_tiny("vit_token", num_classes=3), "linear", solver="lbfgs")
        config = TrainConfig(epochs=2, device="cpu", progress=False, cache_prefix=cached)
        fit(
            model,
            train,
            val,
            config=config,
            run_dir=tmp_path / run,
            class_names=["a", "b", "c"],
            multilabel=False,
            prefix_cache=cache if cached else None,
        )
        return model.get_classifier()

    plain = probe("plain", cached=False)
    first = probe("first", cached=True)
    assert cache.stats["computed"] == len(train) + len(val)
    second = probe("second", cached=True)
    assert cache.stats["computed"] == len(train) + len(val)  # every feature of the second run was a hit
    for head in (first, second):
        torch.testing.assert_close(head.weight, plain.weight, rtol=0, atol=0)
        torch.testing.assert_close(head.bias, plain.bias, rtol=0, atol=0)
