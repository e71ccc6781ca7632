"""Temperature/Platt scaling, decision thresholds and the bootstrap CI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptvit.evaluation import (
    Calibration,
    bootstrap_ci,
    choose_thresholds,
    fit_calibration,
    threshold_report,
)


def _overconfident(n: int = 400, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a model right ~60 % of the time but ~always > 95 % sure: sharpened by a factor of 6."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (n,), generator=g)
    base = torch.randn(n, classes, generator=g)
    base[torch.arange(n), targets] += 1.0
    return 6.0 * base, targets


def test_temperature_scaling_lowers_val_nll_and_keeps_argmax() -> None:
    logits, targets = _overconfident()
    calibration = fit_calibration(logits, targets, multilabel=False)
    before = torch.nn.functional.cross_entropy(logits.double(), targets)
    after = torch.nn.functional.cross_entropy(calibration.apply(logits.double()), targets)
    assert calibration.temperature > 2.0  # over-confident: it must soften
    assert float(after) < float(before) - 0.1
    assert calibration.val_nll_after == pytest.approx(float(after), rel=1e-6)
    assert torch.equal(calibration.probabilities(logits).argmax(1), logits.argmax(1))
    # the optimum: NLL at T is not beaten by T * 1.05 or T / 1.05
    for factor in (1.05, 1 / 1.05):
        other = torch.nn.functional.cross_entropy(
            logits.double() / (calibration.temperature * factor), targets
        )
        assert float(other) >= float(after) - 1e-9


def test_calibrated_model_stays_at_temperature_one() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3000, 3, generator=g)
    targets = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)  # labels drawn from the model
    calibration = fit_calibration(logits, targets, multilabel=False)
    assert calibration.temperature == pytest.approx(1.0, abs=0.1)


def test_platt_per_class_and_degenerate_class_kept_identity() -> None:
    g = torch.Generator().manual_seed(2)
    targets = (torch.rand(300, 3, generator=g) < 0.4).float()
    targets[:, 2] = 0.0  # no positives in validation: nothing to fit
    logits = 5.0 * (targets * 2 - 1) * torch.rand(300, 3, generator=g) + torch.randn(300, 3, generator=g) * 3
    calibration = fit_calibration(logits, targets, multilabel=True)
    assert calibration.kind == "platt"
    assert calibration.scale[2] == 1.0 and calibration.bias[2] == 0.0
    assert calibration.val_nll_after < calibration.val_nll_before
    assert all(a > 0 for a in calibration.scale)  # rankings (AUC/AP) unchanged


def test_calibration_round_trip_and_bad_entries() -> None:
    calibration = Calibration("platt", scale=[0.5, 2.0], bias=[0.1, -0.2])
    again = Calibration.from_dict(calibration.to_dict(), num_classes=2)
    z = torch.tensor([[1.0, -1.0]])
    assert torch.equal(again.apply(z), calibration.apply(z))
    with pytest.raises(ValueError, match="positive"):
        Calibration.from_dict({"kind": "temperature", "temperature": -1}, 2)
    with pytest.raises(ValueError, match="2 finite"):
        Calibration.from_dict({"kind": "platt", "scale": [1.0], "bias": [0.0, 0.0]}, 2)
    with pytest.raises(ValueError, match="kind"):
        Calibration.from_dict({"kind": "isotonic"}, 2)


def test_youden_threshold_and_report_by_hand() -> None:
    p1 = torch.tensor([0.1, 0.3, 0.35, 0.4, 0.6, 0.8, 0.9])
    y = torch.tensor([0, 0, 1, 0, 1, 1, 1])
    scores = torch.stack([1 - p1, p1], dim=1)
    chosen = choose_thresholds(scores, y, multilabel=False, class_names=["normal", "pneumonia"])
    # t = 0.6: sens 3/4, spec 3/3 -> J 0.75; t = 0.35: sens 4/4, spec 2/3 -> J 0.667
    assert chosen["classes"]["pneumonia"]["threshold"] == pytest.approx(0.6)
    report = threshold_report(scores, y, multilabel=False, thresholds=chosen)["pneumonia"]
    assert report["confusion"] == {"tp": 3, "fp": 0, "fn": 1, "tn": 3}
    assert report["sensitivity"] == pytest.approx(75.0)
    assert report["specificity"] == pytest.approx(100.0)
    assert report["ppv"] == pytest.approx(100.0)
    assert report["npv"] == pytest.approx(75.0)
    by_sensitivity = choose_thresholds(
        scores, y, multilabel=False, class_names=["n", "p"], rule="sensitivity", target_sensitivity=1.0
    )
    assert by_sensitivity["classes"]["p"]["threshold"] == pytest.approx(0.35)


def test_thresholds_degenerate_and_bad_input() -> None:
    scores = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    chosen = choose_thresholds(scores, torch.tensor([1, 1]), multilabel=False, class_names=["a", "b"])
    assert chosen["classes"]["b"]["threshold"] == 0.5 and "lacks" in chosen["classes"]["b"]["rule"]
    report = threshold_report(scores, torch.tensor([1, 1]), False, chosen)["b"]
    assert report["specificity"] is None and report["npv"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="binary or multi-label"):
        choose_thresholds(torch.full((2, 3), 1 / 3), torch.tensor([0, 1]), False, ["a", "b", "c"])
    with pytest.raises(ValueError, match="rule"):
        choose_thresholds(scores, torch.tensor([0, 1]), False, ["a", "b"], rule="best")


def test_multilabel_thresholds_per_class() -> None:
    scores = torch.tensor([[0.9, 0.2], [0.2, 0.7], [0.4, 0.6], [0.7, 0.1]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    chosen = choose_thresholds(scores, targets, multilabel=True, class_names=["a", "b"])
    assert chosen["classes"]["a"]["threshold"] == pytest.approx(0.7)
    assert chosen["classes"]["b"]["threshold"] == pytest.approx(0.7)


def test_bootstrap_coverage_near_nominal() -> None:
    """Seeded simulation: 95 % percentile intervals of an accuracy cover the true rate in 88-99 % of trials."""
    rng = np.random.default_rng(0)
    truth, n, trials = 0.7, 200, 200
    covered = 0
    for trial in range(trials):
        correct = rng.random(n) < truth
        ci = bootstrap_ci(lambda idx, c=correct: float(c[idx].mean()), n, resamples=400, seed=trial)
        covered += ci["low"] <= truth <= ci["high"]
    assert 0.88 <= covered / trials <= 0.99


def test_bootstrap_resamples_whole_groups() -> None:
    # two groups: all-right and all-wrong; group resampling can only give 0, 0.5 or 1 when groups are equal size
    correct = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    groups = ["a", "a", "a", "b", "b", "b"]
    seen = set()
    ci = bootstrap_ci(
        lambda idx: seen.add(len(idx)) or float(correct[idx].mean()), 6, groups=groups, resamples=200
    )
    assert seen == {6} and ci["units"] == "groups" and ci["num_units"] == 2
    assert ci["low"] == 0.0 and ci["high"] == 1.0
    with pytest.raises(ValueError, match="group ids"):
        bootstrap_ci(lambda idx: 0.0, 5, groups=groups)


def test_bootstrap_drops_undefined_replicates() -> None:
    ci = bootstrap_ci(lambda idx: None if idx[0] == 0 else 1.0, 3, resamples=100, seed=0)
    assert ci["undefined_resamples"] > 0 and ci["low"] == 1.0
