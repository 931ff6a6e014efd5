"""The objective loss from hidden states and output heads, without ``[N, V]`` logits.

The reference path (``objective_loss``) takes ``[B, T, V]`` logits of every view; at V = 151,936
three such tensors exhaust memory long before the models do. This path takes each view's hidden
states at the valid completion tokens (``[N, d]``) and its output-head weight (``[V, d]``) and
projects ``chunk_rows`` rows at a time, so extra memory is O(chunk_rows x V) (Liger-Kernel's
chunked loss).
The per-token maths is the reference path's own ``token_losses``; only the plumbing lives here:

1. statistics pass (only if the objective routes on thresholds and none are given): project the
   ``statistics_views`` chunk by chunk, keep the ``[N]`` statistics, merge, fix the thresholds;
2. loss pass: per chunk, project every view, evaluate ``token_losses``, weight the rows by
   ``row_weights`` (one reduction, divided by the step's global count) and take the gradient
   w.r.t. the chunk's student logits at once, pushing it through the projection into ``[N, d]``
   and ``[V, d]`` buffers. The returned loss's backward only scales those buffers.

Assumes logits = hidden @ weight.T exactly: a head with a bias or logit softcapping must use the
reference path (the trainer falls back to it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from dopd.objectives.base import (
    Objective,
    ObjectiveOutput,
    ObjectiveThresholds,
    TokenLosses,
    objective_metrics,
    token_losses,
)
from dopd.objectives.statistics import merge_statistics
from dopd.objectives.views import (
    VIEW_NAMES,
    TokenViews,
    ViewHead,
    ViewName,
    check_token_classes,
    compute_dtype,
    entropy_and_sampled_logp,
)

DEFAULT_CHUNK_ROWS = 1024


@dataclass
class ChunkedOutput(ObjectiveOutput):
    """What ``chunked_objective_loss`` returns.

    Attributes:
        loss: 0-d float (float32 or wider), differentiable w.r.t. the student's hidden states
            and head.
        per_token_loss: ``[N]`` float weighted per-token loss before reduction, detached.
        groups: ``[N]`` long group index of every row.
        thresholds: the step-level thresholds used (``None`` if the objective has none).
        statistics: name -> ``[N]`` float per-token statistics.
        metrics: name -> Python float, as ``ObjectiveOutput.metrics``.
        student_entropy: ``[N]`` float entropy (nats) of the student's logits before the loss
            temperature, when asked for (``student_metrics=True``), else None.
        student_log_probs: ``[N]`` float log-prob of each sampled token under those logits,
            when asked for (``student_metrics=True``), else None.
    """

    student_entropy: Tensor | None = None
    student_log_probs: Tensor | None = None


def chunked_statistics(
    objective: Objective,
    heads: Mapping[ViewName, ViewHead],
    token_ids: Tensor,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, Tensor]:
    """Per-token statistics of ``objective``, projecting only its ``statistics_views``.

    Merge the results of every micro-batch and rank (``merge_statistics``) and pass
    ``objective.thresholds(merged)`` to ``chunked_objective_loss`` for exact step-level routing.
    Arguments as in ``chunked_objective_loss``; only the ``statistics_views`` must be in
    ``heads``.

    Returns:
        name -> ``[N]`` float, detached.
    """
    needed = set(objective.statistics_views)
    projected = _projected(objective, heads, token_ids, chunk_rows, needed)
    return _statistics(objective, projected, token_ids, chunk_rows)


def chunked_objective_loss(
    objective: Objective,
    heads: Mapping[ViewName, ViewHead],
    token_ids: Tensor,
    row_weights: Tensor,
    *,
    thresholds: ObjectiveThresholds = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    student_metrics: bool = False,
    token_classes: Tensor | None = None,
    rollout_log_probs: Tensor | None = None,
) -> ChunkedOutput:
    """Loss of ``objective`` on ``N`` valid completion tokens; equals ``objective_loss`` on the
    logits ``hidden @ weight.T`` of every view, in value and gradient.

    Args:
        objective: the routing rule and its options (temperature, top-K, ...).
        heads: view name -> ``ViewHead`` with ``[N, d_view]`` hidden states at the valid tokens
            (``hidden[mask]``) and the view's ``[V, d_view]`` head, for ``student`` and every
            view the objective reads (``priv_student`` is the student on the hinted prompt: the
            student's own head). Gradient flows into the student's hidden states and head weight
            (which may be tied to its embedding); the other views are constant.
        token_ids: ``[N]`` long, the sampled completion tokens.
        row_weights: ``[N]`` float, each token's factor in the step's loss
            (``reduction.row_weights(mask, reduction, denominator)``).
        thresholds: step-level thresholds; None computes them from these ``N`` rows.
        chunk_rows: rows projected at a time; peak memory grows as ``chunk_rows x V``.
        student_metrics: also return the student's per-row entropy and sampled-token log-prob
            (metrics), computed from each chunk's logits while they exist.
        token_classes: ``[N]`` long, each row's true class as an index into
            ``objective.token_class_names``, only for objectives that route on it.
        rollout_log_probs: ``[N]`` float, the rollout engine's log-prob of each token, read by
            ``importance_correction='truncated'`` only.

    Returns:
        ``ChunkedOutput``; the loss is ``sum(row_weights * per_token_loss)``.
    """
    student = heads.get("student")
    if student is not None:
        # Cast once, differentiably: the loss's gradient reaches the student through this
        # projection, and the detached copy below then costs no second [V, d] cast.
        student = ViewHead(*student.projection(), student.head_dtype)
        heads = {**heads, "student": student}
    projected = _projected(objective, heads, token_ids, chunk_rows, _loss_views(objective))
    if row_weights.shape != token_ids.shape:
        raise ValueError(
            f"row_weights must be [N] = {tuple(token_ids.shape)} like token_ids; "
            f"got {tuple(row_weights.shape)}; build it with reduction.row_weights"
        )
    check_token_classes(
        token_classes,
        torch.ones_like(token_ids, dtype=torch.bool),
        len(objective.token_class_names),
        objective.uses_token_classes,
        type(objective).__name__,
    )
    if not objective.uses_token_classes:
        token_classes = None
    if thresholds is None and objective.uses_thresholds:
        thresholds = objective.thresholds(_statistics(objective, projected, token_ids, chunk_rows))
    student_hidden, student_weight = student.hidden, student.weight
    gradients = None
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad):
        gradients = _Gradients(
            projected["student"], student_hidden.requires_grad, student_weight.requires_grad
        )
    rows = _RowData(token_ids, token_classes, rollout_log_probs)
    value, parts, entropy, log_probs = _loss_pass(
        objective, projected, rows, row_weights, thresholds, chunk_rows, gradients,
        student_metrics,
    )  # fmt: skip
    loss = value if gradients is None else gradients.attach(value, student_hidden, student_weight)
    per_token = torch.cat([part.per_token for part in parts])  # [N]
    groups = torch.cat([part.groups for part in parts])  # [N]
    statistics = merge_statistics(part.statistics for part in parts)
    metrics = objective_metrics(objective, groups, per_token, statistics, thresholds)
    return ChunkedOutput(
        loss, per_token, groups, thresholds, statistics, metrics, entropy, log_probs
    )


def _loss_views(objective: Objective) -> set[ViewName]:
    """The views the loss pass reads: the student, the terms' targets, the statistics' views."""
    return {"student", *objective.constant_views}


def _projected(
    objective: Objective,
    heads: Mapping[ViewName, ViewHead],
    token_ids: Tensor,
    chunk_rows: int,
    needed: set[ViewName],
) -> dict[ViewName, ViewHead]:
    """The ``needed`` views, cast to the dtype each head computes in and detached, after checks."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int; got {chunk_rows!r}")
    unknown = sorted(set(heads) - set(VIEW_NAMES))
    if unknown:
        raise ValueError(f"heads has unknown views {unknown}; use names from {VIEW_NAMES}")
    projected = {}
    for name in VIEW_NAMES:
        if name not in needed:
            continue
        if name not in heads:
            raise ValueError(
                f"objective {type(objective).__name__} reads the {name} view; pass "
                f"heads[{name!r}] (its hidden states and output head)"
            )
        _check_head(name, heads[name], token_ids)
        hidden, weight = heads[name].projection()
        projected[name] = ViewHead(hidden.detach(), weight.detach(), heads[name].head_dtype)
    first = next(iter(projected), None)
    for name, head in projected.items():
        if head.weight.shape[0] != projected[first].weight.shape[0]:
            raise ValueError(
                f"vocabulary size mismatch: the {first} head has "
                f"V={projected[first].weight.shape[0]} but the {name} head has "
                f"V={head.weight.shape[0]}; pass the first rows of each head, weight[:V_common] "
                "(V_common from dopd.modeling.loading.common_vocabulary)"
            )
    return projected


def _check_head(name: str, head: ViewHead, token_ids: Tensor) -> None:
    hidden, weight = head.hidden, head.weight
    if token_ids.dim() != 1:
        raise ValueError(
            f"token_ids must be [N] (the valid completion tokens, ids[mask]); "
            f"got {tuple(token_ids.shape)}"
        )
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"heads[{name!r}].hidden must be [N, d] and its weight [V, d]; got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}; pass hidden[mask] and the "
            "model's own output head"
        )
    if hidden.shape[0] != token_ids.shape[0]:
        raise ValueError(
            f"heads[{name!r}].hidden has {hidden.shape[0]} rows but token_ids has "
            f"{token_ids.shape[0]}; "
            "select both with the same mask"
        )


def _chunks(num_rows: int, chunk_rows: int) -> list[slice]:
    # N = 0 still gets one (empty) chunk, so that statistics keep their keys and dtypes.
    return [slice(start, start + chunk_rows) for start in range(0, max(num_rows, 1), chunk_rows)]


@torch.no_grad()
def _logits(heads: dict[ViewName, ViewHead], names, rows: slice) -> dict[str, Tensor]:
    return {name: heads[name].logits(rows) for name in names}  # [C, V] each


@torch.no_grad()
def _statistics(
    objective: Objective, heads: dict[ViewName, ViewHead], token_ids: Tensor, chunk_rows: int
) -> dict[str, Tensor]:
    parts = []
    for rows in _chunks(token_ids.shape[0], chunk_rows):
        logits = _logits(heads, objective.statistics_views, rows)
        parts.append(
            objective.statistics(
                TokenViews.from_rows(logits, token_ids[rows], objective.config.temperature)
            )
        )
    return merge_statistics(parts)


@dataclass(frozen=True)
class _RowData:
    """What the loss pass reads per row besides the views: ``[N]`` token ids, and ``[N]`` token
    classes and engine log-probs where given."""

    token_ids: Tensor
    token_classes: Tensor | None
    rollout_log_probs: Tensor | None

    def views(self, logits: dict[str, Tensor], rows: slice, temperature: float) -> TokenViews:
        """``TokenViews`` of the chunk ``rows`` from its ``[C, V]`` logits."""
        return TokenViews.from_rows(
            logits,
            self.token_ids[rows],
            temperature,
            None if self.token_classes is None else self.token_classes[rows],
            None if self.rollout_log_probs is None else self.rollout_log_probs[rows],
        )


def _loss_pass(
    objective: Objective,
    heads: dict[ViewName, ViewHead],
    data: _RowData,
    row_weights: Tensor,
    thresholds: ObjectiveThresholds,
    chunk_rows: int,
    gradients: _Gradients | None,
    student_metrics: bool,
) -> tuple[Tensor, list[TokenLosses], Tensor | None, Tensor | None]:
    """Sum over chunks of ``row_weights * per_token``, the detached per-chunk ``TokenLosses``,
    the student's ``[N]`` entropy and sampled-token log-prob (when asked), and each chunk's
    gradient pushed into ``gradients`` (when given) before the next chunk."""
    values, parts, entropies, log_probs = [], [], [], []
    for rows in _chunks(data.token_ids.shape[0], chunk_rows):
        student_logits, part, chunk_loss = _chunk_loss(
            objective, heads, data, row_weights, rows, thresholds, gradients is not None
        )
        if gradients is not None:
            gradients.add(rows, torch.autograd.grad(chunk_loss, student_logits)[0])
        if student_metrics:
            entropy, logp = entropy_and_sampled_logp(student_logits, data.token_ids[rows])
            entropies.append(entropy)  # [C]
            log_probs.append(logp)  # [C]
        values.append(chunk_loss.detach())
        part.per_token = part.per_token.detach()
        parts.append(part)
    if not student_metrics:
        return torch.stack(values).sum(), parts, None, None
    return torch.stack(values).sum(), parts, torch.cat(entropies), torch.cat(log_probs)


def _chunk_loss(
    objective: Objective,
    heads: dict[ViewName, ViewHead],
    data: _RowData,
    row_weights: Tensor,
    rows: slice,
    thresholds: ObjectiveThresholds,
    requires_grad: bool,
) -> tuple[Tensor, TokenLosses, Tensor]:
    """The chunk's student logits ``[C, V]`` (a leaf), its ``TokenLosses`` and its weighted sum.

    The views go out of scope on return, so the constant views' ``[C, V]`` logits are freed
    before the backward pass allocates its gradients.
    """
    # A leaf in the heads' dtype: its gradient includes the upcast and the temperature.
    student_logits = heads["student"].logits(rows).requires_grad_(requires_grad)  # [C, V]
    constant_logits = _logits(heads, [name for name in heads if name != "student"], rows)
    with torch.enable_grad():
        views = data.views(
            {"student": student_logits, **constant_logits}, rows, objective.config.temperature
        )
        part = token_losses(objective, views, thresholds)
        chunk_loss = (row_weights[rows].to(part.per_token.dtype) * part.per_token).sum()
    return student_logits, part, chunk_loss


class _Gradients:
    """The student projection's gradient, filled chunk by chunk.

    The chunk's gradient w.r.t. its logits goes through ``logits = hidden @ weight.T`` by hand
    (``addmm_`` into one buffer) rather than by ``autograd.grad`` w.r.t. the weight, which would
    allocate a fresh ``[V, d]`` tensor per chunk.
    """

    def __init__(self, head: ViewHead, hidden: bool, weight: bool):
        self.head = head
        self.hidden = torch.zeros_like(head.hidden) if hidden else None  # [N, d]
        # Accumulated over chunks in float32 or wider, rounded to the weight's dtype once.
        self.weight = (
            torch.zeros(
                head.weight.shape, dtype=compute_dtype(head.weight.dtype), device=head.weight.device
            )
            if weight
            else None
        )  # [V, d]

    def add(self, rows: slice, grad_logits: Tensor) -> None:
        """Add the gradient of ``rows`` from ``grad_logits`` ``[C, V]`` (w.r.t. their logits)."""
        if self.hidden is not None:
            self.hidden[rows] = grad_logits @ self.head.weight
        if self.weight is not None:
            self.weight.addmm_(
                grad_logits.T.to(self.weight.dtype), self.head.hidden[rows].to(self.weight.dtype)
            )

    def attach(self, value: Tensor, student_hidden: Tensor, student_head_weight: Tensor) -> Tensor:
        """``value`` as a loss whose backward sends the stored gradients to the student."""
        weight = None if self.weight is None else self.weight.to(student_head_weight.dtype)
        return _AttachGradients.apply(
            value, student_hidden, student_head_weight, self.hidden, weight
        )


class _AttachGradients(torch.autograd.Function):
    """Identity on a 0-d loss whose gradients w.r.t. the student were computed during forward."""

    @staticmethod
    def forward(ctx, value, student_hidden, student_head_weight, grad_hidden, grad_weight):
        # Kept on ctx rather than saved: backward hands the buffers themselves out (no second
        # [V, d] copy) and drops them, so a second backward fails instead of reusing scaled buffers.
        ctx.gradients = (grad_hidden, grad_weight)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        gradients, ctx.gradients = ctx.gradients, None
        if gradients is None:
            raise RuntimeError(
                "chunked_objective_loss: backward already ran on this loss; compute it again"
            )
        scaled = [
            None if grad is None else grad.mul_(grad_output.to(grad.dtype)) for grad in gradients
        ]
        return None, *scaled, None, None
