"""The training engine: ``fit`` a wrapped model, ``evaluate`` it, ``predict_scores``.

It knows tuning methods only through ``PromptModel`` and the ``Method`` hooks, and datasets only as torch
datasets of ``(image, target)`` pairs; it never imports ``promptvit.data`` or the CLI.
"""

from promptvit.errors import ResumeError, TrainingError
from promptvit.train.callbacks import Callback
from promptvit.train.config import EvaluationConfig, TrainConfig
from promptvit.train.engine import FitResult, evaluate, fit, predict_logits, predict_scores
from promptvit.train.losses import classification_loss
from promptvit.train.metrics import compute_metrics

__all__ = [
    "Callback",
    "EvaluationConfig",
    "FitResult",
    "ResumeError",
    "TrainConfig",
    "TrainingError",
    "classification_loss",
    "compute_metrics",
    "evaluate",
    "fit",
    "predict_logits",
    "predict_scores",
]
