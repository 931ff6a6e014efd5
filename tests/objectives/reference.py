"""Plain float64 references for the objective tests, restated from docs/method.md and
docs/objectives.md.

Nothing here imports dopd. Every function works on probabilities with numpy and explicit loops,
so a test compares the code under test with an independent computation, never with itself.
Gradients are analytic: ``dJ/dlogit_i = p_i (g_i - sum_j p_j g_j)`` with ``g = dJ/dp``.
"""

from __future__ import annotations

import math

import numpy as np

LH, LL, HT, HS = 0, 1, 2, 3
REVERSE_KL, JS, FORWARD_KL = 1.0, 0.5, 0.0


def softmax(logits) -> np.ndarray:
    """``[V]`` logits (``-inf`` allowed) -> ``[V]`` float64 probabilities."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def kl(p, q) -> float:
    """KL(P || Q) = sum_v P(v) log(P(v) / Q(v)); entries with P(v) = 0 add nothing."""
    total = 0.0
    for p_v, q_v in zip(p, q):
        if p_v > 0:
            total += p_v * (math.log(p_v) - math.log(q_v))
    return total


def gjsd(s, q, beta: float) -> float:
    """JSD_beta(S, Q): beta KL(Q||M) + (1 - beta) KL(S||M), M = beta Q + (1 - beta) S.

    The end points are the KL divergences the family approaches: 0 is KL(Q||S), 1 is KL(S||Q).
    """
    s, q = np.asarray(s, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if beta == 0.0:
        return kl(q, s)
    if beta == 1.0:
        return kl(s, q)
    m = beta * q + (1.0 - beta) * s
    return beta * kl(q, m) + (1.0 - beta) * kl(s, m)


def gjsd_prob_grad(s, q, beta: float) -> np.ndarray:
    """``dJSD_beta / dS(v)`` with every S(v) a free coordinate (derived by hand)."""
    s, q = np.asarray(s, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if beta == 0.0:
        return -q / s
    if beta == 1.0:
        return np.log(s) - np.log(q) + 1.0
    m = beta * q + (1.0 - beta) * s
    return (1.0 - beta) * (np.log(s) - np.log(m))


def softmax_backward(probs, prob_grad) -> np.ndarray:
    """Chain rule through a softmax: ``[V]`` gradient w.r.t. its logits."""
    return probs * (prob_grad - (probs * prob_grad).sum())


def topk_ids(logits, k: int) -> list[int]:
    """The ``min(k, V)`` largest entries' ids."""
    order = np.argsort(-np.asarray(logits, dtype=np.float64), kind="stable")
    return [int(i) for i in order[: min(k, len(order))]]


def support_ids(student_logits, target_logits, k: int, source: str) -> list[int]:
    """Sorted vocabulary ids of a top-K support (``student``, ``teacher`` = target, ``union``)."""
    student, target = set(topk_ids(student_logits, k)), set(topk_ids(target_logits, k))
    return sorted({"student": student, "teacher": target, "union": student | target}[source])


def restricted_probs(logits, support: list[int], tail: bool) -> np.ndarray:
    """Renormalised probabilities over ``support``, or full-vocabulary ones plus a tail entry."""
    logits = np.asarray(logits, dtype=np.float64)
    if not tail:
        return softmax(logits[support])
    probs = softmax(logits)[support]
    return np.append(probs, 1.0 - probs.sum())


def support_divergence(student_logits, target_logits, support: list[int], tail: bool, beta: float):
    """JSD_beta between student and target on a support: (value, ``[V]`` grad w.r.t. student
    logits)."""
    student_logits = np.asarray(student_logits, dtype=np.float64)
    s = restricted_probs(student_logits, support, tail)
    q = restricted_probs(target_logits, support, tail)
    g = gjsd_prob_grad(s, q, beta)
    grad = np.zeros_like(student_logits)
    if not tail:
        grad[support] = softmax_backward(s, g)
    else:
        # Each vocabulary id feeds the support entry that holds it, or else the tail entry.
        per_id = np.full_like(student_logits, g[-1])
        per_id[support] = g[:-1]
        grad = softmax_backward(softmax(student_logits), per_id)
    return gjsd(s, q, beta), grad


def full_divergence(student_logits, target_logits, beta: float):
    """JSD_beta over the whole vocabulary: (value, ``[V]`` grad w.r.t. student logits)."""
    return support_divergence(
        student_logits, target_logits, list(range(len(student_logits))), False, beta
    )


def surrogate_coefficient(student_p_y: float, target_p_y: float, beta: float) -> float:
    """``c(y)`` of the sampled-token surrogate ``sg(c(y)) log S(y)`` (docs/method.md §7)."""
    if beta == 0.0:
        return -target_p_y / student_p_y
    if beta == 1.0:
        return math.log(student_p_y) - math.log(target_p_y)
    mixture = beta * target_p_y + (1.0 - beta) * student_p_y
    return (1.0 - beta) * (math.log(student_p_y) - math.log(mixture))


def trimmed_mean(values, trim_quantile: float) -> float:
    """Mean of the values ``<=`` their ``trim_quantile`` quantile (numpy's default: linear)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return 0.0
    cutoff = np.quantile(values, trim_quantile, method="linear")
    return float(values[values <= cutoff].mean())


def regime(gap: float, q_student: float, q_teacher: float, thresholds) -> int:
    """DOPD's routing with its tie rules (docs/method.md §3); ``thresholds`` is ``(A_bar, qS_bar,
    qT_bar)``."""
    gap_bar, q_student_bar, q_teacher_bar = thresholds
    if gap < gap_bar:
        return LH if q_student + q_teacher >= q_student_bar + q_teacher_bar else LL
    return HT if q_teacher >= q_student else HS


def sequence_mean(per_token, mask) -> float:
    """Mean over sequences with >= 1 valid token of each sequence's mean valid-token loss."""
    means = [per_token[b][mask[b]].mean() for b in range(len(mask)) if mask[b].any()]
    return float(np.mean(means)) if means else 0.0


def token_mean(per_token, mask) -> float:
    """Sum over valid tokens divided by their count."""
    return float(per_token[mask].sum() / max(mask.sum(), 1))


def reduction_weights(mask, reduction: str) -> np.ndarray:
    """``[B, T]`` d loss / d per-token loss of each reduction (0 at padding)."""
    mask = np.asarray(mask, dtype=bool)
    if reduction == "token_mean":
        return mask / max(mask.sum(), 1)
    lengths = mask.sum(-1, keepdims=True)
    return mask / np.maximum(lengths, 1) / max((lengths > 0).sum(), 1)


class DOPDReference:
    """DOPD on numpy ``[B, T, V]`` float64 arrays, one token at a time.

    Routes: LH reverse KL top-K to the teacher (beta_light), LL reverse KL top-K to the privileged
    student (beta_weak), HT JS over the full vocabulary to the teacher (beta_deep), HS reverse KL
    top-K to the privileged student (beta_light).
    """

    def __init__(
        self,
        *,
        beta_light=0.6,
        beta_weak=0.3,
        beta_deep=1.0,
        top_k=128,
        source="student",
        tail=False,
        trim_quantile=0.95,
        regimes=(LH, LL, HT, HS),
        reduction="sequence_mean",
    ):
        self.weights = {LH: beta_light, LL: beta_weak, HT: beta_deep, HS: beta_light}
        self.top_k, self.source, self.tail = top_k, source, tail
        self.trim_quantile, self.enabled, self.reduction = trim_quantile, set(regimes), reduction

    def statistics(self, priv_student, teacher, ids, mask):
        """``(gap, q_student, q_teacher)`` lists over the valid tokens in row-major order."""
        gaps, q_students, q_teachers = [], [], []
        for b, t in zip(*np.nonzero(mask)):
            q_student = softmax(priv_student[b, t])[ids[b, t]]
            q_teacher = softmax(teacher[b, t])[ids[b, t]]
            gaps.append(abs(math.log(q_teacher) - math.log(q_student)))
            q_students.append(q_student)
            q_teachers.append(q_teacher)
        return gaps, q_students, q_teachers

    def thresholds(self, statistics):
        return tuple(trimmed_mean(values, self.trim_quantile) for values in statistics)

    def token(self, student, priv_student, teacher, regime_index):
        """Weighted loss and ``[V]`` gradient of one token routed to ``regime_index``."""
        if regime_index not in self.enabled:
            return 0.0, np.zeros_like(student)
        if regime_index == HT:
            value, grad = full_divergence(student, teacher, JS)
        else:
            target = teacher if regime_index == LH else priv_student
            support = support_ids(student, target, self.top_k, self.source)
            value, grad = support_divergence(student, target, support, self.tail, REVERSE_KL)
        weight = self.weights[regime_index]
        return weight * value, weight * grad

    def __call__(self, student, priv_student, teacher, ids, mask, thresholds=None):
        """``(loss, [B, T, V] grad, [B, T] regimes with -1 padding, [B, T] per-token loss)``."""
        statistics = self.statistics(priv_student, teacher, ids, mask)
        thresholds = self.thresholds(statistics) if thresholds is None else thresholds
        regimes = np.full(mask.shape, -1)
        per_token = np.zeros(mask.shape)
        token_grads = np.zeros(student.shape)
        for n, (b, t) in enumerate(zip(*np.nonzero(mask))):
            regimes[b, t] = regime(statistics[0][n], statistics[1][n], statistics[2][n], thresholds)
            per_token[b, t], token_grads[b, t] = self.token(
                student[b, t], priv_student[b, t], teacher[b, t], regimes[b, t]
            )
        reduce = sequence_mean if self.reduction == "sequence_mean" else token_mean
        grad = token_grads * reduction_weights(mask, self.reduction)[..., None]
        return reduce(per_token, mask), grad, regimes, per_token
