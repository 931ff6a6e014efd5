"""DOPD's four-regime router (docs/method.md §3): a pure function of per-token statistics.

LH  A <  A_bar  and  q_S + q_T >= q_S_bar + q_T_bar   light teacher
LL  A <  A_bar  and  q_S + q_T <  q_S_bar + q_T_bar   weak self-anchor
HT  A >= A_bar  and  q_T >= q_S                        deep teacher
HS  A >= A_bar  and  q_T <  q_S                        light self-anchor

Two controls replace the rule (``DOPDConfig.routing``): ``shuffle_regimes`` keeps its regime
counts and deals the labels to the tokens at random; ``oracle_regimes`` reads each token's regime
off its true class (a synthetic task that knows why each token is hard).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from dopd.objectives.statistics import Thresholds

Regime = Literal["LH", "LL", "HT", "HS"]
REGIMES: tuple[Regime, ...] = get_args(Regime)
LH, LL, HT, HS = range(4)


def assign_regimes(statistics: dict[str, Tensor], thresholds: Thresholds) -> Tensor:
    """Regime index of every token.

    Args:
        statistics: ``advantage_gap``, ``q_student``, ``q_teacher``, each ``[N]`` float.
        thresholds: the step's ``Thresholds``.

    Returns:
        ``[N]`` long in {0=LH, 1=LL, 2=HT, 3=HS}.
    """
    gap, q_student, q_teacher = (
        statistics["advantage_gap"],
        statistics["q_student"],
        statistics["q_teacher"],
    )
    low_gap = gap < thresholds.A
    confident = (q_student + q_teacher) >= (thresholds.q_student + thresholds.q_teacher)
    teacher_more_confident = q_teacher >= q_student
    low = torch.where(confident, LH, LL)
    high = torch.where(teacher_more_confident, HT, HS)
    return torch.where(low_gap, low, high)


def shuffle_regimes(regimes: Tensor) -> Tensor:
    """The same labels in a random order: every regime keeps its count, the tokens are dealt
    their labels at random (torch's global RNG of ``regimes``' device).

    Args:
        regimes: ``[N]`` long.

    Returns:
        ``[N]`` long, a permutation of ``regimes``.
    """
    return regimes[torch.randperm(regimes.numel(), device=regimes.device)]


def oracle_regimes(token_classes: Tensor, class_regimes: Tensor) -> Tensor:
    """The regime of every token's class.

    Args:
        token_classes: ``[N]`` long, each token's class as an index into ``class_regimes``.
        class_regimes: ``[C]`` long, the regime index of each class.

    Returns:
        ``[N]`` long in {0=LH, 1=LL, 2=HT, 3=HS}.
    """
    return class_regimes.to(token_classes.device)[token_classes]
