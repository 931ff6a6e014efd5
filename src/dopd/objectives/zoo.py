"""The baseline objectives (docs/method.md §7), each a small routing rule over shared kernels.

* ``Uniform`` — every token gets one term: vanilla OPD, Priv.T->S, GKD, OPCD, self-distillation
  (OPSD / SDPO-style) and the divergence x granularity grid are presets of it (``registry``).
* ``EOPD`` — reverse KL everywhere, plus forward KL where the teacher's entropy is high.
* ``TIP`` — train only on the token quadrants (student entropy x divergence) that are kept.
* ``ExOPD`` — reverse KL to the extrapolated target ``pi_T^lambda * pi_ref^(1 - lambda)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from dopd.errors import require_choice, require_range
from dopd.hashing import hash_uniform
from dopd.objectives.base import (
    GRANULARITIES,
    Granularity,
    Objective,
    ObjectiveOptions,
    Term,
    check_subset,
)
from dopd.objectives.divergences import DIVERGENCES, LOG_FLOOR, Divergence
from dopd.objectives.support import SupportSource
from dopd.objectives.views import TokenViews


@dataclass(frozen=True, kw_only=True)
class UniformConfig(ObjectiveOptions):
    """One term for every token.

    Attributes:
        target: ``teacher`` or ``priv_student`` (stop-gradient self-distillation).
        divergence: ``forward_kl``, ``reverse_kl``, ``js`` or ``gjsd``.
        granularity: ``sampled``, ``topk`` or ``full``.
        jsd_beta: the beta of ``gjsd`` (GKD's JSD_beta; 0 forward KL, 1 reverse KL).
    """

    target: Literal["teacher", "priv_student"] = "teacher"
    divergence: Divergence = "reverse_kl"
    granularity: Granularity = "topk"
    jsd_beta: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("target", self.target, ("teacher", "priv_student"))
        require_choice("divergence", self.divergence, DIVERGENCES)
        require_choice("granularity", self.granularity, GRANULARITIES)
        require_range("jsd_beta", self.jsd_beta, low=0.0, high=1.0)


class Uniform(Objective):
    """Every valid token gets ``Term(target, divergence, granularity)``."""

    def __init__(self, config: UniformConfig):
        super().__init__(config)

    def routes(self) -> tuple[tuple[Term, ...], ...]:
        c = self.config
        return ((Term(c.target, c.divergence, c.granularity, 1.0, c.jsd_beta),),)


@dataclass(frozen=True, kw_only=True)
class EOPDConfig(ObjectiveOptions):
    """Entropy-aware OPD (Jin et al., arXiv 2603.07079).

    Attributes:
        entropy_threshold: teacher entropy (nats) above which forward KL is added.
        forward_weight: weight of the forward-KL term.
        top_k, topk_support: the forward KL's support (the teacher's top-16 by default).
    """

    top_k: int = 16
    topk_support: SupportSource = "teacher"
    entropy_threshold: float = 0.8
    forward_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_range("entropy_threshold", self.entropy_threshold, low=0.0)
        require_range("forward_weight", self.forward_weight, low=0.0)


class EOPD(Objective):
    """Sampled-token reverse KL on every token; plus top-K forward KL where H(teacher) > tau."""

    group_names = ("low_entropy", "high_entropy")
    statistics_views = ("teacher",)

    def routes(self) -> tuple[tuple[Term, ...], ...]:
        reverse = Term("teacher", "reverse_kl", "sampled", 1.0)
        forward = Term("teacher", "forward_kl", "topk", self.config.forward_weight)
        return ((reverse,), (reverse, forward))

    def statistics(self, views: TokenViews) -> dict[str, Tensor]:
        return {"teacher_entropy": views.entropy("teacher")}

    def assign(self, views: TokenViews, statistics: dict[str, Tensor], thresholds: None) -> Tensor:
        return (statistics["teacher_entropy"] > self.config.entropy_threshold).long()


TIP_QUADRANTS = (
    "low_entropy_low_gap",
    "low_entropy_high_gap",
    "high_entropy_low_gap",
    "high_entropy_high_gap",
)


@dataclass(frozen=True, kw_only=True)
class TIPConfig(ObjectiveOptions):
    """Token-importance selection (Xu et al., "TIP", arXiv 2604.14084), as read by dopd.

    Tokens are split on two axes at the step's ``split_quantile``: the student's entropy and the
    sampled-token gap ``|log S(y) - log T(y)|``. Only quadrants in ``keep`` are trained; the rest
    contribute 0 and still count in the denominator.
    """

    split_quantile: float = 0.5
    keep: tuple[str, ...] = (
        "low_entropy_high_gap",
        "high_entropy_low_gap",
        "high_entropy_high_gap",
    )
    divergence: Divergence = "reverse_kl"
    granularity: Granularity = "sampled"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_range("split_quantile", self.split_quantile, low=0.0, high=1.0)
        object.__setattr__(self, "keep", check_subset("keep", self.keep, TIP_QUADRANTS))
        require_choice("divergence", self.divergence, DIVERGENCES)
        require_choice("granularity", self.granularity, GRANULARITIES)


def _quantile(values: Tensor, q: float) -> Tensor:
    return torch.quantile(values, q) if values.numel() else values.new_zeros(())


class TIP(Objective):
    """Train on the kept (student entropy x gap) quadrants only."""

    group_names = TIP_QUADRANTS
    statistics_views = ("student", "teacher")

    def routes(self) -> tuple[tuple[Term, ...], ...]:
        c = self.config
        term = Term("teacher", c.divergence, c.granularity, 1.0)
        return tuple((term,) if quadrant in c.keep else () for quadrant in TIP_QUADRANTS)

    def statistics(self, views: TokenViews) -> dict[str, Tensor]:
        gap = views.sampled_logp("student").detach().clamp_min(LOG_FLOOR) - views.sampled_logp(
            "teacher"
        ).clamp_min(LOG_FLOOR)
        return {"student_entropy": views.entropy("student"), "gap": gap.abs()}

    def thresholds(self, statistics: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            name: _quantile(values, self.config.split_quantile)
            for name, values in statistics.items()
        }

    def assign(
        self, views: TokenViews, statistics: dict[str, Tensor], thresholds: dict[str, Tensor]
    ) -> Tensor:
        high_entropy = statistics["student_entropy"] >= thresholds["student_entropy"]
        high_gap = statistics["gap"] >= thresholds["gap"]
        return 2 * high_entropy.long() + high_gap.long()

    def metrics(
        self, statistics: dict[str, Tensor], thresholds: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        return {f"threshold/{name}": value for name, value in thresholds.items()}


@dataclass(frozen=True, kw_only=True)
class ExOPDConfig(ObjectiveOptions):
    """Reward-extrapolated OPD (Yang et al., "Learning beyond Teacher", arXiv 2602.12125).

    Maximising ``E[lambda * log(pi_T / pi_ref)] - KL(pi_theta || pi_ref)`` is minimising
    ``KL(pi_theta || Q)`` with ``log Q = lambda log pi_T + (1 - lambda) log pi_ref + const``.

    Attributes:
        extrapolation: lambda; 1 is plain OPD, > 1 extrapolates past the teacher.
        granularity: ``sampled`` (policy-gradient surrogate, default), ``topk`` or ``full``.
    """

    extrapolation: float = 1.25
    granularity: Granularity = "sampled"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_range("extrapolation", self.extrapolation, low=0.0)
        require_choice("granularity", self.granularity, GRANULARITIES)


class ExOPD(Objective):
    """Reverse KL to the extrapolated teacher/reference target."""

    def routes(self) -> tuple[tuple[Term, ...], ...]:
        return ((Term("extrapolated", "reverse_kl", self.config.granularity, 1.0),),)

    def target_logits(self, target: str, views: TokenViews, rows: Tensor) -> Tensor:
        if target != "extrapolated":
            return super().target_logits(target, views, rows)
        lam = self.config.extrapolation
        teacher_logp = views.logits["teacher"][rows].log_softmax(-1).clamp_min(LOG_FLOOR)
        reference_logp = views.logits["reference"][rows].log_softmax(-1).clamp_min(LOG_FLOOR)
        return lam * teacher_logp + (1.0 - lam) * reference_logp  # [M, V], unnormalised


PruneRule = Literal["high_gap", "low_gap", "random"]
PRUNE_RULES: tuple[PruneRule, ...] = get_args(PruneRule)


@dataclass(frozen=True, kw_only=True)
class PrunedConfig(UniformConfig):
    """A uniform objective that drops a fraction of tokens (the paper's token-pruning analysis).

    Attributes:
        prune: ``high_gap`` drops the tokens with the largest privilege gap ``A``, ``low_gap`` the
            smallest, ``random`` a pseudo-random set (a hash of the token's teacher log-prob, so
            the choice does not depend on batching).
        prune_fraction: share of the step's tokens dropped; they still count in the denominator.
    """

    prune: PruneRule = "high_gap"
    prune_fraction: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("prune", self.prune, PRUNE_RULES)
        require_range("prune_fraction", self.prune_fraction, low=0.0, high=1.0, high_open=True)


class Pruned(Uniform):
    """``Uniform`` on the kept tokens; the privilege gap needs the privileged-student view."""

    group_names = ("kept", "dropped")
    statistics_views = ("priv_student", "teacher")

    def __init__(self, config: PrunedConfig):
        super().__init__(config)

    def routes(self) -> tuple[tuple[Term, ...], ...]:
        return (super().routes()[0], ())

    def statistics(self, views: TokenViews) -> dict[str, Tensor]:
        teacher_logp = views.sampled_logp("teacher").clamp_min(LOG_FLOOR)
        gap = (teacher_logp - views.sampled_logp("priv_student").clamp_min(LOG_FLOOR)).abs()
        key = hash_uniform(teacher_logp.double().view(torch.int64))
        return {"advantage_gap": gap, "prune_key": key.to(gap.dtype)}

    def thresholds(self, statistics: dict[str, Tensor]) -> dict[str, Tensor]:
        c = self.config
        gap = statistics["advantage_gap"]
        return {
            "high_gap": _quantile(gap, 1.0 - c.prune_fraction),
            "low_gap": _quantile(gap, c.prune_fraction),
        }

    def assign(
        self, views: TokenViews, statistics: dict[str, Tensor], thresholds: dict[str, Tensor]
    ) -> Tensor:
        rule, gap = self.config.prune, statistics["advantage_gap"]
        if rule == "high_gap":
            dropped = gap > thresholds["high_gap"]
        elif rule == "low_gap":
            dropped = gap < thresholds["low_gap"]
        else:
            dropped = statistics["prune_key"] < self.config.prune_fraction
        return dropped.long()
