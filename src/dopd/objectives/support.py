"""Top-K supports: which vocabulary entries a top-K divergence is computed over, and the
restriction of a distribution to them (renormalised, or with a tail bucket).

docs/method.md §4: the default support is the student's K most probable tokens; the teacher's
top-K and the union of both are options, and so is a (K+1)-th tail entry holding the remaining
mass instead of renormalising over the support.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

SupportSource = Literal["student", "teacher", "union"]
SUPPORT_SOURCES: tuple[SupportSource, ...] = get_args(SupportSource)


def topk_support(
    student_logits: Tensor, target_logits: Tensor, k: int, source: str
) -> tuple[Tensor, Tensor]:
    """Vocabulary ids of the support and which of them are real entries.

    Args:
        student_logits: ``[M, V]`` float, the student's logits (read only, no grad is taken).
        target_logits: ``[M, V]`` float, the target's logits.
        k: support size per model; ``k > V`` means ``V``.
        source: ``"student"``, ``"teacher"`` (the target's top-K) or ``"union"``.

    Returns:
        ``index`` ``[M, K']`` long and ``valid`` ``[M, K']`` bool, with ``K' = min(k, V)`` for a
        single source and ``2 * min(k, V)`` for the union (entries the student's top-K already
        holds are marked invalid, so every vocabulary id is counted once).
    """
    k = min(k, student_logits.shape[-1])
    student_index = student_logits.detach().topk(k, dim=-1).indices
    if source == "student":
        return student_index, torch.ones_like(student_index, dtype=torch.bool)
    target_index = target_logits.detach().topk(k, dim=-1).indices
    if source == "teacher":
        return target_index, torch.ones_like(target_index, dtype=torch.bool)
    # [M, K, K] comparison: fine for the reference path; K is small next to V.
    duplicate = (target_index.unsqueeze(-1) == student_index.unsqueeze(-2)).any(-1)
    index = torch.cat([student_index, target_index], dim=-1)
    valid = torch.cat([torch.ones_like(duplicate), ~duplicate], dim=-1)
    return index, valid


def restrict_to_support(logits: Tensor, index: Tensor, valid: Tensor, tail: bool) -> Tensor:
    """Log-probabilities of a distribution restricted to a support.

    Args:
        logits: ``[M, V]`` float logits of the distribution.
        index: ``[M, K']`` long support ids from ``topk_support``.
        valid: ``[M, K']`` bool, False entries get log-prob ``-inf`` (probability 0).
        tail: False renormalises over the support (softmax of the gathered logits); True keeps the
            full-vocabulary probabilities and appends the remaining mass as one more entry.

    Returns:
        ``[M, K']`` (or ``[M, K' + 1]`` with ``tail``) float log-probabilities summing to 1.
    """
    # A support where every gathered entry is -inf (the other view's top-K lies in this view's
    # masked vocabulary) would make log_softmax / logsumexp return NaN values and gradients. The
    # dtype's lowest finite value stands in for -inf: beside any finite entry its exp is still
    # exactly 0 and the clamp passes it no gradient; an all-masked support becomes uniform
    # (renormalised) or puts all its mass in the tail entry.
    lowest = torch.finfo(logits.dtype).min
    if not tail:
        gathered = logits.gather(-1, index).clamp_min(lowest).masked_fill(~valid, float("-inf"))
        return gathered.log_softmax(-1)
    logp = (
        logits.log_softmax(-1)
        .gather(-1, index)
        .clamp_min(lowest)
        .masked_fill(~valid, float("-inf"))
    )
    covered = logp.logsumexp(-1, keepdim=True)
    # log(1 - exp(covered)) via expm1 for precision near 1; the clamp keeps the log finite (and
    # its gradient zero) when the support already holds all the mass.
    remaining = (-torch.expm1(covered)).clamp_min(torch.finfo(logp.dtype).tiny)
    return torch.cat([logp, remaining.log()], dim=-1)
