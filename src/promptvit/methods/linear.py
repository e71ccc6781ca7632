"""Linear probing: only the classifier head is tuned."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal

from torch import nn

from promptvit.backbones import Geometry, adapter_for, unwrap_base_layers
from promptvit.methods.base import ConfigError, Method, MethodConfig, register_method

SOLVERS = ("lbfgs", "sgd", "optimizer")


@dataclasses.dataclass
class HeadSolverConfig(MethodConfig):
    """How a head on frozen features is fitted (``linear``, ``mlp``).

    ``solver="lbfgs"`` fits it to convergence on cached features (:mod:`promptvit.train.probe`): at the fixed
    L2 strength of scikit-learn's ``LogisticRegression(C=1)``, unless validation has enough images per class
    to choose one from ``l2_grid`` (default 1e-6 .. 1e2, two per decade; an explicit ``l2_grid`` is always
    searched), as the CLIP and DINOv2 linear evaluations do. ``"sgd"`` and ``"optimizer"`` (one solver, two
    names) train it with the run's optimiser (``train.optimizer``, SGD by default) over the epochs.
    ``linear`` defaults to ``lbfgs``, ``mlp`` to ``optimizer``; the papers' recipes set ``sgd``.
    """

    solver: Literal["lbfgs", "sgd", "optimizer"] = "optimizer"
    l2_grid: list[float] | None = None

    method_label = "linear"  # not a field: names the method in errors

    def validate(self) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError(
                f"{self.method_label}: solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}"
            )
        if self.l2_grid is not None and (not self.l2_grid or min(self.l2_grid) <= 0):
            raise ConfigError(
                f"{self.method_label}: l2_grid must be a non-empty list of positive strengths, got {self.l2_grid}"
            )


class SolvedHead:
    """Mixed into the methods configured by a :class:`HeadSolverConfig`."""

    config: HeadSolverConfig

    def fits_head_to_convergence(self) -> bool:
        return self.config.solver == "lbfgs"

    def check_solver(self, backbone: nn.Module) -> None:
        """The L-BFGS fit needs one linear (or 1x1-conv) head on the pre-logit features. Any other head (heads
        per branch, a norm or weights inside the head: some timm models seen through the generic adapter) is
        trained by the run's optimiser instead, said in a warning and recorded as solver 'sgd'."""
        adapter = adapter_for(backbone)
        if self.fits_head_to_convergence() and not (
            adapter.head_reads_pre_logits()
            and len(adapter.classifier_modules()) == 1
            and isinstance(unwrap_base_layers(adapter.get_classifier()), (nn.Linear, nn.Conv2d))
        ):
            warnings.warn(
                f"{self.config.method_label}: the head of {type(backbone).__name__} is not one linear layer on the "
                "pre-logit features, so L-BFGS cannot fit it on them; it is trained by the run's optimiser "
                "(solver 'sgd')",
                stacklevel=4,
            )
            self.config = dataclasses.replace(self.config, solver="sgd")


@dataclasses.dataclass
class LinearConfig(HeadSolverConfig):
    """The frozen backbone's features feed a new linear head, fitted to convergence by default (see
    :class:`HeadSolverConfig` for the solver)."""

    solver: Literal["lbfgs", "sgd", "optimizer"] = "lbfgs"

    identity_options = ("solver",)  # the default was the optimiser before the L-BFGS probe


@register_method
class Linear(SolvedHead, Method):
    name = "linear"
    table_rank = 0
    is_baseline = True
    config_class = LinearConfig
    paper = "linear probing (baseline in VPT, Jia et al. 2022)"
    supported_kinds = ("vit", "cnn")
    identity_at_init = True

    def attach(self, backbone: nn.Module) -> None:
        self.check_solver(backbone)

    def tuned_from_block(self) -> int:
        """Only the head is tuned: the pre-logit features are frozen (ViT and CNN)."""
        return self.geometry.depth

    @classmethod
    def expected_num_parameters(cls, config: LinearConfig, geometry: Geometry) -> int:
        return 0
