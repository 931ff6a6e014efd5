"""dopd: Dual On-policy Distillation (arXiv 2606.30626) and its baselines for Hugging Face
causal LMs."""

from dopd.objectives.dopd import DOPD, DOPDConfig, DOPDOutput, dopd_loss
from dopd.objectives.statistics import (
    Thresholds,
    compute_thresholds,
    merge_statistics,
    privilege_statistics,
)

__all__ = [
    "DOPD",
    "DOPDConfig",
    "DOPDOutput",
    "Thresholds",
    "compute_thresholds",
    "dopd_loss",
    "merge_statistics",
    "privilege_statistics",
]
