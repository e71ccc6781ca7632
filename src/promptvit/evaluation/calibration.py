"""Post-hoc calibration fitted on the validation split: temperature scaling, per-class Platt scaling.

* single-label: one temperature T > 0, probabilities softmax(z / T) (Guo et al. 2017). The validation NLL
  is convex in 1/T, so a bounded 1-D search over log T in [log 0.05, log 20] finds its minimum; argmax
  predictions never change;
* multi-label: per class c, sigmoid(a_c z_c + b_c) (Platt scaling) with a_c in [0.05, 20], fitted by
  L-BFGS-B on that class's validation BCE; a class whose validation labels are all equal keeps a = 1,
  b = 0 (nothing to fit). Since a_c > 0, each class's ranking (AUC, AP) is unchanged.

A fit that would not lower the validation NLL keeps the identity. The fit sees validation logits only;
test logits are merely transformed. ``Calibration.to_dict``/``from_dict`` is what the artifact stores
(``adapter_config.json``, key ``calibration``).

**Limits** (``checked=True``, the default; docs/clinical-evaluation.md, "When calibration is not applied"): a
fit on too few validation images fits noise, so the identity is kept, with a warning, and ``applied: false``
plus the ``reason`` and the fitted value recorded, when

* single-label: the smallest class of the validation set has fewer than ``min_per_class`` images
  (:data:`MIN_PER_CLASS`, 10 by default), or the fitted temperature sits at a bound of [0.05, 20] (within
  1 % of it, where the search stopped rather than found a minimum);
* multi-label, per class: fewer than ``min_per_class`` validation positives or negatives, or the fitted
  scale at a bound of [0.05, 20]; the other classes keep their fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from promptvit.errors import ArtifactError
from promptvit.evaluation.probability import scores_from_logits

LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))
SCALE_BOUNDS = (0.05, 20.0)
BIAS_BOUND = 50.0  # Platt bias in [-BIAS_BOUND, BIAS_BOUND]
#: validation images per class (positives and negatives per class for multi-label) a fit needs by default
MIN_PER_CLASS = 10
_AT_BOUND = 0.01  # a fitted value within 1 % of a bound is "at" it: the search stopped at the edge


def _at_bound(value: float) -> bool:
    return any(abs(math.log(value) - math.log(bound)) < _AT_BOUND for bound in SCALE_BOUNDS)


@dataclass
class Calibration:
    kind: str  # "temperature" | "platt"
    temperature: float = 1.0
    scale: list[float] = field(default_factory=list)
    bias: list[float] = field(default_factory=list)
    val_nll_before: float | None = None
    val_nll_after: float | None = None
    fitted_on: str = "val"
    #: False when the checks kept the identity (the probabilities stay uncalibrated); ``reason`` says why
    applied: bool = True
    reason: str | None = None
    #: the fit that was set aside (temperature, or per-class scale/bias), when ``applied`` is False
    fitted: dict[str, Any] | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated logits: z / T, or a * z + b per class."""
        if self.kind == "temperature":
            return logits / self.temperature
        scale = torch.tensor(self.scale, dtype=logits.dtype, device=logits.device)
        bias = torch.tensor(self.bias, dtype=logits.dtype, device=logits.device)
        return logits * scale + bias

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        calibrated = self.apply(logits)
        return scores_from_logits(calibrated, multilabel=self.kind == "platt")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "fitted_on": self.fitted_on}
        if self.kind == "temperature":
            out["temperature"] = self.temperature
        else:
            out.update(scale=self.scale, bias=self.bias)
        out.update(val_nll_before=self.val_nll_before, val_nll_after=self.val_nll_after)
        out.update(applied=self.applied, reason=self.reason, fitted=self.fitted)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], num_classes: int) -> Calibration:
        """Validated: a damaged entry raises ValueError naming what is wrong."""
        kind = data.get("kind")
        if kind == "temperature":
            t = data.get("temperature")
            if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"calibration temperature must be a positive number, got {t!r}")
            return cls(
                "temperature",
                temperature=float(t),
                val_nll_before=data.get("val_nll_before"),
                val_nll_after=data.get("val_nll_after"),
                **_status(data),
            )
        if kind == "platt":
            scale, bias = data.get("scale"), data.get("bias")
            for name, values in (("scale", scale), ("bias", bias)):
                if (
                    not isinstance(values, list)
                    or len(values) != num_classes
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
                ):
                    raise ValueError(
                        f"calibration {name} must be {num_classes} finite numbers, got {values!r}"
                    )
            return cls(
                "platt",
                scale=[float(v) for v in scale],
                bias=[float(v) for v in bias],
                val_nll_before=data.get("val_nll_before"),
                val_nll_after=data.get("val_nll_after"),
                **_status(data),
            )
        raise ValueError(f"calibration kind must be 'temperature' or 'platt', got {kind!r}")


def _status(data: dict[str, Any]) -> dict[str, Any]:
    """``applied``/``reason``/``fitted`` of a stored entry (entries written before these keys: applied)."""
    applied = data.get("applied", True)
    if not isinstance(applied, bool):
        raise ValueError(f"calibration 'applied' must be true or false, got {applied!r}")
    return {"applied": applied, "reason": data.get("reason"), "fitted": data.get("fitted")}


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits, targets))


def _bce(z: np.ndarray, y: np.ndarray) -> float:
    # log(1 + e^-z) for positives, log(1 + e^z) for negatives, in a stable form
    return float(np.mean(np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1 - y)))


def fit_calibration(
    logits: torch.Tensor,
    targets: torch.Tensor,
    multilabel: bool,
    *,
    checked: bool = True,
    min_per_class: int = MIN_PER_CLASS,
) -> Calibration:
    """Fit on validation ``logits`` (N, C) and ``targets``; see the module docstring. ``checked=False`` applies
    the fit whatever the validation size and wherever it lands."""
    logits = logits.detach().to("cpu", torch.float64)
    targets = targets.detach().cpu()
    limit = min_per_class if checked else 0
    if multilabel:
        return _fit_platt(logits.numpy(), (targets >= 0.5).double().numpy(), limit, checked)
    return _fit_temperature(logits, targets.long(), limit, checked)


def _fit_temperature(logits: torch.Tensor, targets: torch.Tensor, limit: int, checked: bool) -> Calibration:
    from scipy.optimize import minimize_scalar

    counts = torch.bincount(targets, minlength=logits.shape[1])
    if int(counts.min()) < limit:
        return Calibration(
            "temperature",
            applied=False,
            reason=f"validation has {int(counts.min())} images in its smallest class, fewer than the {limit} "
            "a temperature fit needs",
        )
    before = _nll(logits, targets)
    found = minimize_scalar(
        lambda log_t: _nll(logits / math.exp(log_t), targets),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature, after = math.exp(found.x), float(found.fun)
    if not after < before:
        temperature, after = 1.0, before
    if checked and _at_bound(temperature):
        return Calibration(
            "temperature",
            val_nll_before=before,
            val_nll_after=before,
            applied=False,
            reason=f"the fitted temperature {temperature:.3g} sits at a bound of [{SCALE_BOUNDS[0]:g}, "
            f"{SCALE_BOUNDS[1]:g}]: the validation set cannot pin it down",
            fitted={"temperature": temperature, "val_nll_after": after},
        )
    return Calibration("temperature", temperature=temperature, val_nll_before=before, val_nll_after=after)


def _fit_platt(z: np.ndarray, y: np.ndarray, limit: int, checked: bool) -> Calibration:
    from scipy.optimize import minimize

    scale, bias, kept = [], [], {}
    for c in range(z.shape[1]):
        zc, yc = z[:, c], y[:, c]
        a, b = 1.0, 0.0
        positives = int(yc.sum())
        if min(positives, len(yc) - positives) < max(limit, 1):
            if 0 < positives < len(yc):
                kept[c] = f"{positives} positives and {len(yc) - positives} negatives (fewer than {limit})"
        else:
            found = minimize(
                lambda ab, zc=zc, yc=yc: _bce(ab[0] * zc + ab[1], yc),
                x0=np.array([1.0, 0.0]),
                method="L-BFGS-B",
                bounds=[SCALE_BOUNDS, (-BIAS_BOUND, BIAS_BOUND)],
            )
            if found.fun < _bce(zc, yc):
                a, b = float(found.x[0]), float(found.x[1])
            if checked and _at_bound(a):
                kept[c] = f"scale {a:.3g} at a bound"
                a, b = 1.0, 0.0
        scale.append(a)
        bias.append(b)
    after = float(np.mean([_bce(scale[c] * z[:, c] + bias[c], y[:, c]) for c in range(z.shape[1])]))
    before = float(np.mean([_bce(z[:, c], y[:, c]) for c in range(z.shape[1])]))
    applied = any(a != 1.0 or b != 0.0 for a, b in zip(scale, bias, strict=True)) or not kept
    reason = (
        f"{len(kept)} of {z.shape[1]} classes kept uncalibrated: "
        + "; ".join(f"class {c}: {why}" for c, why in kept.items())
        if kept
        else None
    )
    return Calibration(
        "platt",
        scale=scale,
        bias=bias,
        val_nll_before=before,
        val_nll_after=after,
        applied=applied,
        reason=reason,
    )


def artifact_calibration(info: dict[str, Any], where: object) -> Calibration | None:
    """The calibration stored in an artifact's config (None if it has none); a damaged entry -> ArtifactError."""
    data = info.get("calibration")
    if data is None:
        return None
    try:
        return Calibration.from_dict(data, len(info["class_names"]))
    except ValueError as error:
        raise ArtifactError(
            f"{where}: 'calibration' entry is damaged ({error}); retrain or remove it"
        ) from error
