"""DOPD: route each token by the privilege advantage gap (docs/method.md §2–§5).

LH  privileged teacher        reverse KL, top-K   weight beta_light
LL  privileged student (sg)   reverse KL, top-K   weight beta_weak
HT  privileged teacher        Jensen-Shannon, full vocabulary   weight beta_deep
HS  privileged student (sg)   reverse KL, top-K   weight beta_light

``routing`` picks who assigns the regimes: the gap rule (``gap``), the gap rule's labels dealt
to the tokens at random (``shuffled``), or the tokens' true classes (``oracle``, via
``oracle_regimes``); the terms per regime stay the same (docs/method.md §7).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from dopd.errors import ConfigError, require_choice, require_range
from dopd.objectives.base import (
    GRANULARITIES,
    Granularity,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    Term,
    check_subset,
    objective_loss,
)
from dopd.objectives.divergences import DIVERGENCE_BETA, Divergence
from dopd.objectives.routing import REGIMES, assign_regimes, oracle_regimes, shuffle_regimes
from dopd.objectives.statistics import Thresholds, compute_thresholds, privilege_statistics
from dopd.objectives.views import TokenViews

Routing = Literal["gap", "shuffled", "oracle"]
ROUTINGS: tuple[Routing, ...] = get_args(Routing)

# DOPD's own reading of which regime each kind of token belongs to (docs/method.md §3): a
# capability gap is HT; information the student can learn, or tokens forced by what came before,
# by the skill or by the format, are LH; information the student can never see is HS.
DEFAULT_ORACLE_REGIMES = {
    "capability": "HT",
    "learnable_info": "LH",
    "unavailable_info": "HS",
    "order_forced": "LH",
    "skill": "LH",
    "format": "LH",
}


@dataclass(frozen=True, kw_only=True)
class DOPDConfig(ObjectiveOptions):
    """DOPD's options (defaults: the paper's values; docs/method.md §3).

    Attributes:
        beta_light: weight of LH and HS (0.6).
        beta_weak: weight of LL (0.3); must be below ``beta_light``.
        beta_deep: weight of HT (1.0).
        trim_quantile: thresholds drop values above this quantile before averaging (0.95).
        regimes: enabled regimes; tokens of the others contribute 0 but still count in the
            denominator (the paper's regime-subset ablation).
        fixed_divergence, fixed_granularity: when set, every regime uses this divergence /
            granularity, keeping its target and weight (the "no adaptive objectives" ablation).
        routing: who assigns the regimes: ``gap`` (the rule of §3), ``shuffled`` (the rule's
            labels permuted at random among the tokens of each loss call: the same counts, the
            tokens drawn by torch's global RNG) or ``oracle`` (each token's true class, mapped by
            ``oracle_regimes``; the caller supplies the classes).
        oracle_regimes: token class name -> regime name, read when ``routing="oracle"``; a mapping
            given replaces the default one whole.
    """

    beta_light: float = 0.6
    beta_weak: float = 0.3
    beta_deep: float = 1.0
    trim_quantile: float = 0.95
    regimes: tuple[str, ...] = REGIMES
    fixed_divergence: Divergence | None = None
    fixed_granularity: Granularity | None = None
    routing: Routing = "gap"
    oracle_regimes: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ORACLE_REGIMES))

    def __post_init__(self) -> None:
        super().__post_init__()
        require_range("beta_light", self.beta_light, low=0.0)
        require_range("beta_weak", self.beta_weak, low=0.0)
        require_range("beta_deep", self.beta_deep, low=0.0)
        if self.beta_weak >= self.beta_light:
            raise ConfigError(
                f"beta_weak={self.beta_weak!r} must be below beta_light={self.beta_light!r} "
                "(the weak self-anchor is the lightest term); lower beta_weak or raise beta_light"
            )
        require_range("trim_quantile", self.trim_quantile, low=0.0, high=1.0, low_open=True)
        if isinstance(self.regimes, str):
            raise ConfigError(
                f"regimes={self.regimes!r} must be a list of regime names such as ['LH', 'HT']"
            )
        object.__setattr__(self, "regimes", check_subset("regimes", self.regimes, REGIMES))
        if not self.regimes:
            raise ConfigError(
                "regimes=() enables no regime, so the loss would always be 0; "
                "list at least one of LH, LL, HT, HS"
            )
        if self.fixed_divergence is not None:
            require_choice("fixed_divergence", self.fixed_divergence, DIVERGENCE_BETA)
        if self.fixed_granularity is not None:
            require_choice("fixed_granularity", self.fixed_granularity, GRANULARITIES)
        require_choice("routing", self.routing, ROUTINGS)
        object.__setattr__(self, "oracle_regimes", _check_oracle_regimes(self.oracle_regimes))


def _check_oracle_regimes(mapping: Any) -> dict[str, str]:
    """A copy of ``mapping`` (class name -> regime name) once every entry is valid."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(
            f"oracle_regimes={mapping!r} must be a mapping of token class names to regimes, "
            "e.g. {capability: HT, format: LH}"
        )
    if not mapping:
        raise ConfigError(
            "oracle_regimes={} maps no token class; map every class the task labels, "
            "e.g. {capability: HT, format: LH}"
        )
    for name, regime in mapping.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"oracle_regimes: key {name!r} must be a non-empty token class name (a string)"
            )
        require_choice(f"oracle_regimes.{name}", regime, REGIMES)
    return dict(mapping)


class DOPD(Objective):
    """The DOPD router over the student, privileged-student and privileged-teacher views."""

    group_names = REGIMES
    statistics_views = ("priv_student", "teacher")

    def __init__(self, config: DOPDConfig):
        super().__init__(config)
        # [C] long: the regime of each class of token_class_names (oracle routing).
        self._class_regimes = torch.tensor(
            [REGIMES.index(regime) for regime in config.oracle_regimes.values()], dtype=torch.long
        )

    @property
    def token_class_names(self) -> tuple[str, ...]:
        """The classes of ``oracle_regimes`` when routing on them (``routing="oracle"``)."""
        return tuple(self.config.oracle_regimes) if self.config.routing == "oracle" else ()

    def routes(self) -> tuple[tuple[Term, ...], ...]:
        c = self.config
        table = {
            "LH": Term("teacher", "reverse_kl", "topk", c.beta_light),
            "LL": Term("priv_student", "reverse_kl", "topk", c.beta_weak),
            "HT": Term("teacher", "js", "full", c.beta_deep),
            "HS": Term("priv_student", "reverse_kl", "topk", c.beta_light),
        }
        if c.fixed_divergence is not None:
            table = {r: replace(t, divergence=c.fixed_divergence) for r, t in table.items()}
        if c.fixed_granularity is not None:
            table = {r: replace(t, granularity=c.fixed_granularity) for r, t in table.items()}
        return tuple((table[r],) if r in c.regimes else () for r in REGIMES)

    def statistics(self, views: TokenViews) -> dict[str, Tensor]:
        return privilege_statistics(
            views.sampled_logp("priv_student"), views.sampled_logp("teacher")
        )

    def thresholds(self, statistics: dict[str, Tensor]) -> Thresholds:
        return compute_thresholds(statistics, self.config.trim_quantile)

    def assign(
        self, views: TokenViews, statistics: dict[str, Tensor], thresholds: Thresholds
    ) -> Tensor:
        routing = self.config.routing
        if routing == "oracle":
            return oracle_regimes(views.token_classes, self._class_regimes)
        regimes = assign_regimes(statistics, thresholds)
        return shuffle_regimes(regimes) if routing == "shuffled" else regimes

    def metrics(self, statistics: dict[str, Tensor], thresholds: Thresholds) -> dict[str, Any]:
        gap = statistics["advantage_gap"]
        return {
            "threshold/A": thresholds.A,
            "threshold/q_student": thresholds.q_student,
            "threshold/q_teacher": thresholds.q_teacher,
            "advantage_gap_mean": gap.sum() / max(gap.numel(), 1),
        }


class DOPDOutput(ObjectiveOutput):
    """``ObjectiveOutput`` with DOPD's names: ``regimes`` ``[B, T]`` long (0=LH, 1=LL, 2=HT,
    3=HS, -1 padding) and ``advantage_gap`` ``[B, T]`` float (0 at padding)."""

    @property
    def regimes(self) -> Tensor:
        return self.groups

    @property
    def advantage_gap(self) -> Tensor:
        return self.statistics["advantage_gap"]


def dopd_loss(
    student_logits: Tensor,
    priv_student_logits: Tensor,
    teacher_logits: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    config: DOPDConfig = DOPDConfig(),
    thresholds: Thresholds | None = None,
    *,
    denominator: Tensor | float | None = None,
    token_classes: Tensor | None = None,
) -> DOPDOutput:
    """The DOPD loss of one batch of on-policy rollouts.

    Args:
        student_logits: ``[B, T, V]`` student on ``x, y<t`` (gradient flows here only).
        priv_student_logits: ``[B, T, V]`` the same weights on ``x, p, y<t`` (treated as constant).
        teacher_logits: ``[B, T, V]`` the teacher on ``x, p, y<t`` (treated as constant).
        completion_ids: ``[B, T]`` long; position t of each logits tensor produced token t.
        completion_mask: ``[B, T]`` bool or 0/1.
        config: ``DOPDConfig``.
        thresholds: step-level ``Thresholds`` (see ``compute_thresholds``); None computes them from
            this call's valid tokens.
        denominator: step-level count from ``loss_denominator``; None uses this batch's.
        token_classes: ``[B, T]`` long, each token's class as an index into
            ``config.oracle_regimes`` (-1 at padding); only read, and then required, when
            ``config.routing="oracle"``.

    Returns:
        ``DOPDOutput`` with ``loss`` (0-d), ``regimes``, ``advantage_gap``, ``thresholds`` and
        ``metrics``. Computed in float32 or wider whatever the input dtype.
    """
    out = objective_loss(
        DOPD(config),
        student_logits,
        priv_student_logits,
        teacher_logits,
        completion_ids,
        completion_mask,
        thresholds=thresholds,
        denominator=denominator,
        token_classes=token_classes,
    )
    return DOPDOutput(**vars(out))
