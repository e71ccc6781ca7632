"""Linear probing: only the classifier head is tuned."""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from promptvit.backbones import Geometry, adapter_for
from promptvit.methods.base import BatchedChange, ConfigError, Method, MethodConfig, register_method


@dataclasses.dataclass
class HeadSolverConfig(MethodConfig):
    """How a head on frozen features is fitted (``linear``, ``mlp``).

    ``solver="optimizer"`` trains it with the run's optimiser and epochs; ``"lbfgs"`` fits it to convergence
    on cached features with the L2 strength chosen on val from ``l2_grid`` (default 1e-6 .. 1e2, two per
    decade), as the CLIP and DINOv2 linear evaluations do (:mod:`promptvit.train.probe`).
    """

    solver: Literal["optimizer", "lbfgs"] = "optimizer"
    l2_grid: list[float] | None = None

    method_label = "linear"  # not a field: names the method in errors

    def validate(self) -> None:
        if self.solver not in ("optimizer", "lbfgs"):
            raise ConfigError(
                f"{self.method_label}: solver must be 'optimizer' or 'lbfgs', got {self.solver!r}"
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
        """The L-BFGS fit needs a linear head on the pre-logit features; refuse it for any other head."""
        adapter = adapter_for(backbone)
        if self.fits_head_to_convergence() and not (
            adapter.head_reads_pre_logits() and isinstance(adapter.get_classifier(), nn.Linear)
        ):
            raise ConfigError(
                f"{self.config.method_label}: solver 'lbfgs' fits a linear head on the pre-logit features, and the "
                f"classifier of {type(backbone).__name__} is not one; use solver 'optimizer'"
            )


@dataclasses.dataclass
class LinearConfig(HeadSolverConfig):
    """The frozen backbone's features feed a new linear head (see :class:`HeadSolverConfig` for the solver)."""


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

    def batched_changes(self, backbone: nn.Module) -> list[BatchedChange]:
        return []

    @classmethod
    def expected_num_parameters(cls, config: LinearConfig, geometry: Geometry) -> int:
        return 0
