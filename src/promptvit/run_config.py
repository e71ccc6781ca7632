"""``RunConfig``: one training run's config, validated, unknown keys refused (``promptvit train --config``).

Its sections are defined where they are used: ``backbone`` (:class:`~promptvit.backbones.spec.BackboneSpec`),
``data`` (:class:`~promptvit.data.spec.DataSpec`), ``train`` and ``evaluation`` (``promptvit.train.config``);
``method`` (:class:`MethodSpec`) is checked against the method registry. Protocols and the command line read
and write run configs through this module without importing the run pipeline (``promptvit.experiment``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from promptvit.backbones.spec import BackboneSpec
from promptvit.data.spec import DataSpec, resolve_data_spec
from promptvit.io import check_run_name
from promptvit.methods.base import make_config
from promptvit.train.config import EvaluationConfig, TrainConfig
from promptvit.validation import FINITE


class MethodSpec(BaseModel):
    """Which method and its options (``promptvit methods`` lists them)."""

    model_config = FINITE

    name: str = "linear"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_method(self) -> MethodSpec:
        make_config(self.name, **self.options)  # raises ConfigError naming the bad option
        return self


class RunConfig(BaseModel):
    """One run: backbone, method, data, training and evaluation options, and where its folder goes."""

    model_config = FINITE

    backbone: BackboneSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output_dir: str = "runs"
    name: str | None = Field(None, description="run folder name (default: method-shots-seed)")

    @field_validator("name")
    @classmethod
    def _name_stays_in_output_dir(cls, name: str | None) -> str | None:
        return check_run_name(name) if name is not None else None

    def run_dir(self) -> Path:
        """``output_dir/name``; by default ``method-Kshot-seedS``, with ``-expE`` for data that comes in exps
        (MedFMC, ``data fewshot`` folders), so two exps of one K never share (and resume) one folder."""
        shots = f"{self.data.shots}shot" if self.data.shots else "all"
        exp = f"-exp{self.data.exp}" if self.data.kind in ("medfmc", "fewshot") else ""
        return Path(self.output_dir) / (self.name or f"{self.method.name}-{shots}{exp}-seed{self.train.seed}")


def resolved_data(config: RunConfig) -> RunConfig:
    """``config`` with its data section resolved (:func:`resolve_data_spec`)."""
    return config.model_copy(update={"data": resolve_data_spec(config.data)})
