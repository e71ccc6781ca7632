"""Reliability diagrams: accuracy against confidence in equal-width bins, as trained and calibrated.

Single-label: top-label confidence max_c p_c against the rate of right predictions; multi-label: every
(image, class) probability against the rate of that class being present. Bars show each bin's accuracy,
the diagonal is perfect calibration, and the gap to it is what ECE averages (definitions in
``promptvit.evaluation.probability``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from promptvit.analysis._plotting import colour, new_figure, save_figure, wrap
from promptvit.evaluation.probability import DEFAULT_BINS, probability_metrics, reliability_of


def reliability_view(
    runs: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    multilabel: bool,
    path: str | Path,
    *,
    bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """``runs``: model name -> {"as trained" | "calibrated": (probabilities, targets)}. One panel per model;
    returns the bins and ECE/NLL/Brier of every curve drawn."""
    names = list(runs)
    fig, axes = new_figure(1, len(names), width=4.2, height=4.0)
    view: dict[str, Any] = {}
    for ax, name in zip(axes[0], names, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        view[name] = {}
        for index, (label, (scores, targets)) in enumerate(runs[name].items()):
            bins_ = reliability_of(scores, targets, multilabel, bins)
            metrics = probability_metrics(scores, targets, multilabel, bins=bins)
            view[name][label] = {
                "bins": bins_,
                **{k: metrics[k] for k in ("ece", "ece_mass", "mce", "nll", "brier")},
            }
            xs = [c for c, n in zip(bins_["confidence"], bins_["counts"], strict=True) if n]
            ys = [a for a, n in zip(bins_["accuracy"], bins_["counts"], strict=True) if n]
            ax.plot(xs, ys, marker="o", color=colour(index), label=f"{label} (ECE {metrics['ece']:.1f}%)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence" if not multilabel else "predicted probability")
        ax.set_ylabel("accuracy" if not multilabel else "fraction present")
        ax.set_title(wrap(name, 40))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    save_figure(fig, path)
    return view
