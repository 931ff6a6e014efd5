"""The objective engine: routing decides, per token, which terms apply; kernels compute them.

An objective is a small routing rule. It names token *groups* (DOPD's four regimes, or a single
``"all"`` group), gives each group a tuple of ``Term``s (target view, divergence, granularity,
weight), and assigns every valid token to one group. ``objective_loss`` does the rest, the same
way for every objective: select valid rows, compute step statistics and thresholds, assign
groups, evaluate each term only on the rows that need it (so a full-vocabulary term costs only its
own rows), weight, reduce once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from dopd.errors import ConfigError, require_choice, require_int, require_range
from dopd.objectives.divergences import (
    DIVERGENCES,
    Divergence,
    divergence_beta,
    generalized_jsd,
    sampled_token_surrogate,
    truncated_importance_weights,
)
from dopd.objectives.reduction import REDUCTIONS, Reduction, reduce_loss
from dopd.objectives.statistics import Thresholds
from dopd.objectives.support import (
    SUPPORT_SOURCES,
    SupportSource,
    restrict_to_support,
    topk_support,
)
from dopd.objectives.views import TokenViews, ViewName, check_token_classes

Granularity = Literal["sampled", "topk", "full"]
GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)
ImportanceCorrection = Literal["none", "truncated"]
IMPORTANCE_CORRECTIONS: tuple[ImportanceCorrection, ...] = get_args(ImportanceCorrection)
Target = Literal["teacher", "priv_student", "extrapolated"]
TARGETS: tuple[Target, ...] = get_args(Target)
# The views each target reads: the extrapolated target mixes the teacher and the reference.
TARGET_VIEWS: dict[Target, tuple[ViewName, ...]] = {
    "teacher": ("teacher",),
    "priv_student": ("priv_student",),
    "extrapolated": ("teacher", "reference"),
}

# An objective's step-level thresholds: DOPD's ``Thresholds``, named 0-d tensors for the zoo
# objectives that route on a batch quantile, or None for objectives that route on none.
ObjectiveThresholds = Thresholds | dict[str, Tensor] | None


@dataclass(frozen=True, kw_only=True)
class ObjectiveOptions:
    """Options every objective shares.

    Attributes:
        top_k: support size of top-K terms (``> V`` means the whole vocabulary).
        topk_support: whose top-K forms the support: ``student``, ``teacher`` or ``union``.
        topk_tail: add a tail entry with the remaining mass instead of renormalising.
        reduction: ``sequence_mean`` (paper) or ``token_mean``.
        temperature: loss temperature dividing every view's logits (sampling has its own knob).
        importance_correction: ``truncated`` multiplies every sampled-token term by
            ``min(pi_train(y) / pi_rollout(y), importance_cap)``, correcting for a rollout
            engine whose numerics differ from the trainer's (``truncated_importance_weights``);
            ``none`` (default) trains as if the trainer had sampled.
        importance_cap: the truncation of those weights.
    """

    top_k: int = 128
    topk_support: SupportSource = "student"
    topk_tail: bool = False
    reduction: Reduction = "sequence_mean"
    temperature: float = 1.0
    importance_correction: ImportanceCorrection = "none"
    importance_cap: float = 2.0

    def __post_init__(self) -> None:
        require_int("top_k", self.top_k, low=1)
        require_choice("topk_support", self.topk_support, SUPPORT_SOURCES)
        require_choice("topk_tail", self.topk_tail, (True, False))
        require_choice("reduction", self.reduction, REDUCTIONS)
        require_range("temperature", self.temperature, low=0.0, low_open=True)
        require_choice("importance_correction", self.importance_correction, IMPORTANCE_CORRECTIONS)
        require_range("importance_cap", self.importance_cap, low=1.0)


@dataclass(frozen=True)
class Term:
    """One divergence between the student and a target on the rows of a group.

    Attributes:
        target: ``teacher``, ``priv_student`` or ``extrapolated`` (objective-defined).
        divergence: ``forward_kl``, ``reverse_kl``, ``js`` or ``gjsd`` (with ``jsd_beta``).
        granularity: ``sampled`` (policy-gradient surrogate), ``topk`` or ``full``.
        weight: multiplies the term.
    """

    target: Target
    divergence: Divergence
    granularity: Granularity
    weight: float = 1.0
    jsd_beta: float = 0.5

    def __post_init__(self) -> None:
        require_choice("target", self.target, TARGETS)
        require_choice("divergence", self.divergence, DIVERGENCES)
        require_choice("granularity", self.granularity, GRANULARITIES)
        require_range("jsd_beta", self.jsd_beta, low=0.0, high=1.0)


@dataclass
class ObjectiveOutput:
    """What ``objective_loss`` returns.

    Attributes:
        loss: 0-d float, differentiable w.r.t. the student logits only.
        per_token_loss: ``[B, T]`` float, weighted per-token contribution (0 at padding), detached.
        groups: ``[B, T]`` long, the group index of each token (``-1`` at padding).
        thresholds: the objective's step-level thresholds (``None`` if it has none).
        statistics: name -> ``[B, T]`` float per-token statistics (0 at padding).
        metrics: name -> Python float (group fractions and mean losses, thresholds, ...).
    """

    loss: Tensor
    per_token_loss: Tensor
    groups: Tensor
    thresholds: ObjectiveThresholds
    statistics: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class Objective:
    """Base class: one group, no statistics. Subclasses override what they route on.

    The views a trainer must produce follow from the objective itself (``constant_views``): its
    terms' targets (``routes``) and the views ``statistics`` reads (``statistics_views``, which a
    trainer scores first, to fix the step's thresholds before any loss). An objective that
    routes on the tokens' true classes (a control on a synthetic task) names them in
    ``token_class_names``; the caller then passes every token's class as an index into it
    (``TokenViews.token_classes``).
    """

    group_names: tuple[str, ...] = ("all",)
    statistics_views: tuple[ViewName, ...] = ()

    def __init__(self, config: ObjectiveOptions):
        self.config = config

    @functools.cached_property
    def constant_views(self) -> frozenset[ViewName]:
        """The views besides the student that the objective reads, scored without gradient: its
        terms' targets (``TARGET_VIEWS``) and its statistics' views."""
        targets = {
            view for terms in self.routes() for t in terms for view in TARGET_VIEWS[t.target]
        }
        return frozenset({*targets, *self.statistics_views} - {"student"})

    @property
    def uses_teacher(self) -> bool:
        return "teacher" in self.constant_views

    @property
    def uses_priv_student(self) -> bool:
        return "priv_student" in self.constant_views

    @property
    def uses_reference(self) -> bool:
        return "reference" in self.constant_views

    @property
    def has_sampled_terms(self) -> bool:
        """Whether any group gets a sampled-token term (what ``importance_correction`` weights)."""
        return any(t.granularity == "sampled" for terms in self.routes() for t in terms)

    @property
    def token_class_names(self) -> tuple[str, ...]:
        """The token classes routing reads (empty: it reads none)."""
        return ()

    @property
    def uses_token_classes(self) -> bool:
        """Whether routing reads each token's true class, which the caller must then supply."""
        return bool(self.token_class_names)

    def routes(self) -> tuple[tuple[Term, ...], ...]:
        """Per group, the terms its tokens get (an empty tuple: the group contributes 0)."""
        raise NotImplementedError

    def statistics(self, views: TokenViews) -> dict[str, Tensor]:
        """Per-token ``[N]`` statistics that thresholds are computed from (detached)."""
        return {}

    def thresholds(self, statistics: dict[str, Tensor]) -> ObjectiveThresholds:
        """Step-level thresholds from statistics merged over a whole optimizer step."""
        return None

    @property
    def uses_thresholds(self) -> bool:
        """Whether routing reads step-level thresholds (the subclass overrides ``thresholds``), so
        that a caller knows when the statistics of the whole step are needed before any loss."""
        return type(self).thresholds is not Objective.thresholds

    def assign(
        self, views: TokenViews, statistics: dict[str, Tensor], thresholds: ObjectiveThresholds
    ) -> Tensor:
        """``[N]`` long group index of every valid token."""
        return torch.zeros(views.num_tokens, dtype=torch.long, device=views.token_ids.device)

    def target_logits(self, target: str, views: TokenViews, rows: Tensor) -> Tensor:
        """``[M, V]`` logits of ``target`` at ``rows`` ``[M]``."""
        return views.logits[target][rows]

    def metrics(
        self, statistics: dict[str, Tensor], thresholds: ObjectiveThresholds
    ) -> dict[str, Tensor]:
        """Extra 0-d tensors to report (converted to floats with the rest)."""
        return {}


def _sampled_term(objective, student, target, ids, beta) -> Tensor:
    """The policy-gradient surrogate at the sampled token only."""
    student_logp_y = student.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    target_logp_y = target.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return sampled_token_surrogate(student_logp_y, target_logp_y, beta)


def _topk_term(objective, student, target, ids, beta) -> Tensor:
    """The divergence on the top-K support (``ObjectiveOptions.topk_support``)."""
    options = objective.config
    index, valid = topk_support(student, target, options.top_k, options.topk_support)
    student_logp = restrict_to_support(student, index, valid, options.topk_tail)
    target_logp = restrict_to_support(target, index, valid, options.topk_tail)
    return generalized_jsd(student_logp, target_logp, beta)


def _full_term(objective, student, target, ids, beta) -> Tensor:
    """The divergence over the whole vocabulary."""
    return generalized_jsd(student.log_softmax(-1), target.log_softmax(-1), beta)


# One kernel per granularity, each ``(objective, student [M, V], target [M, V], ids [M], beta)``
# -> ``[M]``.
TERM_KERNELS: dict[Granularity, Callable[..., Tensor]] = {
    "sampled": _sampled_term,
    "topk": _topk_term,
    "full": _full_term,
}


def term_values(objective: Objective, term: Term, views: TokenViews, rows: Tensor) -> Tensor:
    """``[M]`` unweighted values of ``term`` at ``rows`` ``[M]``."""
    student = views.logits["student"][rows]  # [M, V]
    target = objective.target_logits(term.target, views, rows)  # [M, V]
    beta = divergence_beta(term.divergence, term.jsd_beta)
    kernel = TERM_KERNELS[term.granularity]
    values = kernel(objective, student, target, views.token_ids[rows], beta)
    if term.granularity == "sampled" and objective.config.importance_correction == "truncated":
        if views.rollout_log_probs is None:
            raise ValueError(
                "importance_correction='truncated' needs the rollout engine's log-probs of the "
                "sampled tokens (rollout_log_probs); none were given"
            )
        values = values * truncated_importance_weights(
            views.sampled_logp("student", rows),
            views.rollout_log_probs[rows],
            objective.config.importance_cap,
        )
    return values


@dataclass
class TokenLosses:
    """Per-token results of one set of rows, shared by the reference and the chunked path.

    Attributes:
        per_token: ``[N]`` float weighted per-token loss (differentiable w.r.t. the student view).
        groups: ``[N]`` long group index of every row.
        statistics: name -> ``[N]`` float per-token statistics (detached).
        thresholds: the thresholds the groups were assigned with.
    """

    per_token: Tensor
    groups: Tensor
    statistics: dict[str, Tensor]
    thresholds: ObjectiveThresholds


def token_losses(
    objective: Objective, views: TokenViews, thresholds: ObjectiveThresholds = None
) -> TokenLosses:
    """Route every row of ``views`` and evaluate its group's terms on it.

    Args:
        objective: the routing rule and its options.
        views: ``TokenViews`` of ``N`` rows (a batch's valid tokens, or one chunk of them).
        thresholds: step-level thresholds; None computes them from these rows' statistics.

    Returns:
        ``TokenLosses`` of the ``N`` rows.
    """
    statistics = objective.statistics(views)
    if thresholds is None:
        thresholds = objective.thresholds(statistics)
    groups = objective.assign(views, statistics, thresholds)  # [N]
    # The empty slice keeps the loss attached to the student's graph (with a zero gradient)
    # when no token contributes, e.g. a fully masked batch.
    per_token = views.logits["student"][:, :0].sum(-1)  # [N]
    for index, terms in enumerate(objective.routes()):
        if not terms:
            continue
        rows = (groups == index).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        for term in terms:
            per_token = per_token.index_add(
                0, rows, term.weight * term_values(objective, term, views, rows)
            )
    return TokenLosses(per_token, groups, statistics, thresholds)


def _check_inputs(
    logits: dict[str, Tensor | None], completion_ids: Tensor, completion_mask: Tensor
) -> None:
    if completion_ids.dim() != 2 or completion_mask.shape != completion_ids.shape:
        raise ValueError(
            "completion_ids and completion_mask must both be [B, T]; "
            f"got {tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}"
        )
    vocab = logits["student"].shape[-1]
    for name, value in logits.items():
        if value is None:
            continue
        if value.dim() != 3 or value.shape[:2] != completion_ids.shape:
            raise ValueError(
                f"{name}_logits must be [B, T, V] with [B, T] = {tuple(completion_ids.shape)}; "
                f"got {tuple(value.shape)}"
            )
        if value.shape[-1] != vocab:
            raise ValueError(
                f"vocabulary size mismatch: student_logits has V={vocab} but {name}_logits has "
                f"V={value.shape[-1]}; slice or pad both models' logits to one shared vocabulary"
            )


def objective_metrics(
    objective: Objective,
    groups: Tensor,
    per_token: Tensor,
    statistics: dict,
    thresholds: ObjectiveThresholds,
) -> dict[str, float]:
    """Group fractions and mean losses plus the objective's own metrics, as Python floats.

    Args:
        groups: ``[N]`` long; per_token: ``[N]`` float (detached); statistics: name -> ``[N]``.
    """
    names, values = [], []
    count = max(groups.numel(), 1)
    for index, group in enumerate(objective.group_names):
        members = groups == index
        names += [f"fraction/{group}", f"loss/{group}"]
        values += [members.sum() / count, (per_token * members).sum() / members.sum().clamp_min(1)]
    for name, value in objective.metrics(statistics, thresholds).items():
        names.append(name)
        values.append(torch.as_tensor(value, dtype=per_token.dtype, device=per_token.device))
    # One device sync for all metrics.
    return dict(zip(names, torch.stack([v.to(per_token.dtype) for v in values]).tolist()))


def objective_loss(
    objective: Objective,
    student_logits: Tensor,
    priv_student_logits: Tensor | None,
    teacher_logits: Tensor | None,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    reference_logits: Tensor | None = None,
    thresholds: ObjectiveThresholds = None,
    denominator: Tensor | float | None = None,
    token_classes: Tensor | None = None,
    rollout_log_probs: Tensor | None = None,
) -> ObjectiveOutput:
    """Loss of ``objective`` on one batch of rollouts.

    Args:
        objective: the routing rule and its options.
        student_logits: ``[B, T, V]`` any float dtype; position t scores ``completion_ids[:, t]``.
        priv_student_logits: ``[B, T, V]`` or None when the objective does not use it.
        teacher_logits: ``[B, T, V]`` or None when the objective does not use it.
        completion_ids: ``[B, T]`` long.
        completion_mask: ``[B, T]`` bool or 0/1.
        reference_logits: ``[B, T, V]``, only for objectives that use a reference model.
        thresholds: step-level thresholds; None computes them from this batch.
        denominator: step-level reduction denominator; None uses this batch's.
        token_classes: ``[B, T]`` long, each token's true class as an index into
            ``objective.token_class_names`` (-1 at padding), only for objectives that route on it.
        rollout_log_probs: ``[B, T]`` float, the rollout engine's log-prob of each sampled token,
            read by ``importance_correction='truncated'`` only.

    Returns:
        ``ObjectiveOutput``; gradient reaches ``student_logits`` only.
    """
    logits = {
        "student": student_logits,
        "priv_student": priv_student_logits,
        "teacher": teacher_logits,
        "reference": reference_logits,
    }
    for name in sorted(objective.constant_views):
        if logits[name] is None:
            raise ValueError(f"objective {type(objective).__name__} needs {name}_logits; got None")
    _check_inputs(logits, completion_ids, completion_mask)
    mask = completion_mask.bool()
    check_token_classes(
        token_classes,
        mask,
        len(objective.token_class_names),
        objective.uses_token_classes,
        type(objective).__name__,
    )
    views = TokenViews.from_batch(
        logits,
        completion_ids,
        mask,
        objective.config.temperature,
        token_classes if objective.uses_token_classes else None,
        rollout_log_probs,
    )
    out = token_losses(objective, views, thresholds)
    per_token = out.per_token  # [N]
    per_token_full = torch.zeros(mask.shape, dtype=per_token.dtype, device=per_token.device)
    per_token_full = per_token_full.masked_scatter(mask, per_token)  # [B, T]
    loss = reduce_loss(per_token_full, mask, objective.config.reduction, denominator)
    groups_full = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device).masked_scatter(
        mask, out.groups
    )
    statistics_full = {
        name: torch.zeros(mask.shape, dtype=value.dtype, device=value.device).masked_scatter(
            mask, value
        )
        for name, value in out.statistics.items()
    }
    metrics = objective_metrics(
        objective, out.groups, per_token.detach(), out.statistics, out.thresholds
    )
    return ObjectiveOutput(
        loss, per_token_full.detach(), groups_full, out.thresholds, statistics_full, metrics
    )


def check_subset(key: str, values: tuple, allowed: tuple) -> tuple:
    """Validate a tuple config value whose items must come from ``allowed`` (no duplicates)."""
    values = tuple(values)
    unknown = [v for v in values if v not in allowed]
    if unknown or len(set(values)) != len(values):
        raise ConfigError(
            f"{key}={values!r} must be distinct items of {allowed!r}; "
            f"remove {unknown or 'duplicates'}"
        )
    return values
