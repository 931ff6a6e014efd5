"""DOPD's per-token privilege statistics and the step-level routing thresholds.

docs/method.md §2: for every valid completion token, ``q_S`` and ``q_T`` are the privileged
student's and privileged teacher's probabilities of the sampled token and ``A = |log q_T - log
q_S|``. Each threshold is a trimmed mean over *all* valid tokens of one optimizer step (every
micro-batch and every data-parallel rank): drop the values above the ``trim_quantile`` quantile,
average the rest. Because the quantile needs every value, the exact way to merge micro-batches is
to concatenate their per-token statistics, which ``merge_statistics`` does; thresholds computed
that way do not depend on how the step's batch was split.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from dopd.objectives.divergences import LOG_FLOOR


@dataclass(frozen=True)
class Thresholds:
    """DOPD's step-level thresholds: ``A`` (gap), ``q_student`` and ``q_teacher``; 0-d tensors
    (or floats) in the loss's compute dtype."""

    A: Tensor
    q_student: Tensor
    q_teacher: Tensor


def privilege_statistics(priv_student_logp_y: Tensor, teacher_logp_y: Tensor) -> dict[str, Tensor]:
    """Per-token ``advantage_gap``, ``q_student`` and ``q_teacher`` from sampled-token log-probs.

    Args:
        priv_student_logp_y: ``[N]`` float, ``log pi_theta(y_n | x, p, y<n)``.
        teacher_logp_y: ``[N]`` float, ``log pi_T(y_n | x, p, y<n)``.

    Returns:
        dict of three ``[N]`` float tensors, detached.
    """
    # Floor -inf log-probs (a masked sampled token) so that the gap stays finite.
    log_q_student = priv_student_logp_y.detach().clamp_min(LOG_FLOOR)
    log_q_teacher = teacher_logp_y.detach().clamp_min(LOG_FLOOR)
    return {
        "advantage_gap": (log_q_teacher - log_q_student).abs(),
        "q_student": log_q_student.exp(),
        "q_teacher": log_q_teacher.exp(),
    }


def trimmed_mean(values: Tensor, trim_quantile: float) -> Tensor:
    """Mean of the values ``v <= torch.quantile(values, trim_quantile)`` (linear interpolation).

    Args:
        values: ``[N]`` float; ``N = 0`` gives 0.
        trim_quantile: in (0, 1]; 1 keeps every value.

    Returns:
        0-d float tensor.
    """
    if values.numel() == 0:
        return values.new_zeros(())
    cutoff = torch.quantile(values, trim_quantile)
    kept = values <= cutoff
    return (values * kept).sum() / kept.sum()


def merge_statistics(parts: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-token statistics gathered from micro-batches or ranks, key by key.

    Args:
        parts: dicts of ``[N_i]`` tensors with the same keys.

    Returns:
        dict of ``[sum N_i]`` tensors.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_statistics needs at least one part; got none")
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def compute_thresholds(
    statistics: Mapping[str, Tensor] | Iterable[Mapping[str, Tensor]], trim_quantile: float
) -> Thresholds:
    """DOPD thresholds from the per-token statistics of a whole optimizer step.

    Args:
        statistics: one dict from ``privilege_statistics`` (or ``merge_statistics``), or an
            iterable of such dicts (one per micro-batch / rank), merged exactly first.
        trim_quantile: the quantile above which values are dropped, in (0, 1].

    Returns:
        ``Thresholds`` with 0-d tensors.
    """
    if not isinstance(statistics, Mapping):
        statistics = merge_statistics(statistics)
    return Thresholds(
        A=trimmed_mean(statistics["advantage_gap"], trim_quantile),
        q_student=trimmed_mean(statistics["q_student"], trim_quantile),
        q_teacher=trimmed_mean(statistics["q_teacher"], trim_quantile),
    )
