"""Probability metrics against direct formulas on small hand-made arrays, including degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from promptvit.evaluation.probability import equal_mass_ece, probability_metrics, reliability_bins
from promptvit.train.metrics import compute_metrics


def _ece_direct(conf: np.ndarray, correct: np.ndarray, bins: int) -> tuple[float, float]:
    """Equal-width ECE and MCE (fractions) written out: bin b holds b/bins <= conf < (b+1)/bins."""
    index = np.minimum((conf * bins).astype(int), bins - 1)
    ece, mce = 0.0, 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            gap = abs(correct[chosen].mean() - conf[chosen].mean())
            ece += chosen.mean() * gap
            mce = max(mce, gap)
    return ece, mce


SCORES = torch.tensor(
    [[0.72, 0.18, 0.10], [0.33, 0.41, 0.26], [0.11, 0.23, 0.66], [0.52, 0.46, 0.02], [0.07, 0.87, 0.06]],
    dtype=torch.float64,
)
TARGETS = torch.tensor([0, 2, 2, 1, 1])


def test_single_label_against_formulas() -> None:
    got = probability_metrics(SCORES, TARGETS, multilabel=False, bins=5)
    p = SCORES.numpy()
    y = TARGETS.numpy()
    nll = -np.mean(np.log(p[np.arange(5), y]))
    onehot = np.eye(3)[y]
    brier = np.mean(((p - onehot) ** 2).sum(axis=1))
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    ece, mce = _ece_direct(conf, correct, 5)
    assert got["nll"] == pytest.approx(nll, abs=1e-9)
    assert got["brier"] == pytest.approx(brier, abs=1e-9)
    assert got["ece"] == pytest.approx(100 * ece, abs=1e-4)
    assert got["mce"] == pytest.approx(100 * mce, abs=1e-4)
    # equal mass with 5 bins of 5 samples: one sample per bin, ECE = mean |correct - conf|
    assert got["ece_mass"] == pytest.approx(100 * np.mean(np.abs(correct - conf)), abs=1e-9)


def test_hand_computed_two_sample_case() -> None:
    # two samples, both predicted class 0 with confidence 0.8; one right, one wrong -> one bin, gap 0.3
    scores = torch.tensor([[0.8, 0.2], [0.8, 0.2]])
    got = probability_metrics(scores, torch.tensor([0, 1]), multilabel=False, bins=10)
    assert got["ece"] == pytest.approx(30.0, abs=1e-4)
    assert got["mce"] == pytest.approx(30.0, abs=1e-4)
    # equal mass: two samples, so each is its own bin (ties straddle the cut): gaps 0.2 and 0.8
    assert got["ece_mass"] == pytest.approx(50.0, abs=1e-9)
    assert got["nll"] == pytest.approx(-(math.log(0.8) + math.log(0.2)) / 2, abs=1e-6)
    assert got["brier"] == pytest.approx((0.04 + 0.04 + 0.64 + 0.64) / 2, abs=1e-6)


def test_degenerate_one_class_present_and_all_equal_scores() -> None:
    scores = torch.full((4, 2), 0.5, dtype=torch.float64)
    targets = torch.zeros(4, dtype=torch.long)
    got = probability_metrics(scores, targets, multilabel=False, bins=15)
    # argmax of ties is class 0 (right every time) with confidence 0.5: gap 0.5 in one bin
    assert got["ece"] == pytest.approx(50.0, abs=1e-4)
    assert got["ece_mass"] == pytest.approx(50.0, abs=1e-9)
    assert got["nll"] == pytest.approx(math.log(2))
    assert got["brier"] == pytest.approx(0.5)
    assert all(math.isfinite(v) for v in got.values())


def test_perfect_confident_predictions_have_zero_error() -> None:
    scores = torch.eye(3, dtype=torch.float64)
    got = probability_metrics(scores, torch.arange(3), multilabel=False)
    assert got["ece"] == pytest.approx(0.0, abs=1e-6)
    assert got["brier"] == pytest.approx(0.0)
    assert got["nll"] == pytest.approx(0.0, abs=1e-9)


def test_zero_probability_for_the_true_class_is_clamped() -> None:
    got = probability_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), multilabel=False)
    assert got["nll"] == pytest.approx(-math.log(1e-12))


def test_multilabel_per_class_and_macro() -> None:
    scores = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.3, 0.1], [0.8, 0.4]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    got = probability_metrics(scores, targets, multilabel=True, bins=4, class_names=["a", "b"])
    p, y = scores.numpy(), targets.numpy()
    for c, name in enumerate("ab"):
        ece, _ = _ece_direct(p[:, c], y[:, c], 4)
        assert got["per_class_ece"][name] == pytest.approx(100 * ece, abs=1e-4)
        assert got["per_class_brier"][name] == pytest.approx(np.mean((p[:, c] - y[:, c]) ** 2))
    assert got["ece"] == pytest.approx(np.mean(list(got["per_class_ece"].values())))
    assert got["brier"] == pytest.approx(np.mean((p - y) ** 2))
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert got["nll"] == pytest.approx(bce.mean())


def test_multilabel_class_without_positives() -> None:
    scores = torch.tensor([[0.2, 0.9], [0.1, 0.8]], dtype=torch.float64)
    targets = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    got = probability_metrics(scores, targets, multilabel=True, bins=10)
    assert got["per_class_ece"]["0"] == pytest.approx(15.0, abs=1e-4)  # mean p 0.15, frequency 0
    assert got["per_class_ece"]["1"] == pytest.approx(15.0, abs=1e-4)  # mean p 0.85, frequency 1


def test_equal_mass_bins_split_sorted_runs() -> None:
    conf = np.array([0.9, 0.1, 0.5, 0.7])
    correct = np.array([1.0, 0.0, 0.0, 1.0])
    # sorted: (0.1, 0), (0.5, 0) | (0.7, 1), (0.9, 1): gaps 0.3 and 0.2, each half the mass
    assert equal_mass_ece(conf, correct, bins=2) == pytest.approx(0.25)


def test_reliability_bins_count_and_average() -> None:
    bins = reliability_bins(np.array([0.05, 0.15, 0.12, 1.0]), np.array([0, 1, 0, 1]), bins=10)
    assert bins["counts"][0] == 1 and bins["counts"][1] == 2 and bins["counts"][9] == 1
    assert bins["confidence"][1] == pytest.approx(0.135)
    assert bins["accuracy"][1] == pytest.approx(0.5)
    assert bins["accuracy"][5] is None


def test_compute_metrics_carries_probability_metrics_and_can_leave_them_out() -> None:
    with_them = compute_metrics(SCORES, TARGETS, multilabel=False)
    assert {"nll", "brier", "ece", "ece_mass", "mce"} <= set(with_them)
    without = compute_metrics(SCORES, TARGETS, multilabel=False, bins=None)
    assert "ece" not in without and without["accuracy"] == with_them["accuracy"]


def test_bad_bins_are_refused() -> None:
    with pytest.raises(ValueError, match="bins"):
        probability_metrics(SCORES, TARGETS, multilabel=False, bins=0)
