"""Baseline objectives (dopd.objectives.zoo and its presets) against per-token formulas by hand."""

import math

import numpy as np
import pytest
import torch

from dopd.objectives.registry import build_objective
from tests.objectives import reference, tokenwise
from tests.objectives.batches import batch_loss, random_batch
from tests.tolerance import REORDERED, assert_close


def _entropy(logits) -> float:
    probs = reference.softmax(logits)
    return -sum(p * math.log(p) for p in probs if p > 0)


def _vanilla(student, teacher, token) -> float:
    """sg(log S(y) - log T(y)) * log S(y), the value; its gradient is the coefficient times
    grad log S(y)."""
    log_s, log_t = (
        math.log(reference.softmax(student)[token]),
        math.log(reference.softmax(teacher)[token]),
    )
    return (log_s - log_t) * log_s


def _vanilla_gradient(batch, reduction: str) -> np.ndarray:
    """``[B, T, V]`` gradient of the reduced vanilla-OPD loss:
    w_n (log S(y) - log T(y)) (e_y - S)."""
    student, _, teacher, ids, mask = batch.numpy()
    weights = reference.reduction_weights(mask, reduction)
    grad = np.zeros(student.shape)
    for b, t in zip(*np.nonzero(mask)):
        s, q, y = reference.softmax(student[b, t]), reference.softmax(teacher[b, t]), ids[b, t]
        grad[b, t] = weights[b, t] * (math.log(s[y]) - math.log(q[y])) * (np.eye(len(s))[y] - s)
    return grad


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_vanilla_opd_is_the_sampled_reverse_kl_policy_gradient(reduction):
    batch = random_batch(3, 5, 9, seed=21, lengths=[5, 2, 4])
    batch.student.requires_grad_(True)
    out = batch_loss(build_objective("vanilla_opd", reduction=reduction), batch)
    out.loss.backward()
    assert_close(out.per_token_loss, tokenwise.per_token(batch, _vanilla), ulps=REORDERED)
    assert_close(batch.student.grad, _vanilla_gradient(batch, reduction), ulps=REORDERED)


def test_eopd_adds_forward_kl_exactly_where_teacher_entropy_is_high():
    batch = random_batch(4, 6, 24, seed=22, lengths=[6, 6, 4, 2])  # 18 tokens
    _, _, teacher, _, mask = batch.numpy()
    entropies = np.array([_entropy(teacher[b, t]) for b, t in zip(*np.nonzero(mask))])
    threshold = float(np.median(entropies))  # an even count: the median lies between two tokens
    out = batch_loss(
        build_objective("eopd", entropy_threshold=threshold, forward_weight=0.7), batch
    )

    high = np.zeros(mask.shape, dtype=bool)
    high[mask] = entropies > threshold
    assert 0 < high.sum() < mask.sum()
    np.testing.assert_array_equal(out.groups.numpy()[mask], high[mask].astype(int))
    # Forward KL over the teacher's top-16, both renormalised (EOPD's default support).
    forward = tokenwise.per_token(batch, tokenwise.support_divergence(0.0, 16, source="teacher"))
    expected = tokenwise.per_token(batch, _vanilla) + 0.7 * forward * high
    assert_close(out.per_token_loss, expected, ulps=REORDERED)


def _tip_quadrants(batch, split_quantile: float) -> np.ndarray:
    """``[B, T]`` quadrant 2 * [H(S) >= q] + [|log S(y) - log T(y)| >= q] (-1 at padding)."""
    student, _, teacher, ids, mask = batch.numpy()
    entropy = np.array([_entropy(student[b, t]) for b, t in zip(*np.nonzero(mask))])
    gap = np.array(
        [
            abs(
                math.log(reference.softmax(student[b, t])[ids[b, t]])
                - math.log(reference.softmax(teacher[b, t])[ids[b, t]])
            )
            for b, t in zip(*np.nonzero(mask))
        ]
    )
    high_entropy = entropy >= np.quantile(entropy, split_quantile, method="linear")
    high_gap = gap >= np.quantile(gap, split_quantile, method="linear")
    quadrants = np.full(mask.shape, -1)
    quadrants[mask] = 2 * high_entropy + high_gap
    return quadrants


QUADRANTS = [
    "low_entropy_low_gap",
    "low_entropy_high_gap",
    "high_entropy_low_gap",
    "high_entropy_high_gap",
]


@pytest.mark.parametrize(
    "keep", [None, ("high_entropy_low_gap",), ("low_entropy_low_gap", "high_entropy_high_gap")]
)
def test_tip_trains_exactly_the_kept_quadrants(keep):
    batch = random_batch(4, 6, 10, seed=23, lengths=[6, 5, 3, 4])  # 18 tokens
    objective = build_objective("tip") if keep is None else build_objective("tip", keep=keep)
    out = batch_loss(objective, batch)
    quadrants = _tip_quadrants(batch, 0.5)
    np.testing.assert_array_equal(out.groups.numpy(), quadrants)

    kept_names = keep or ("low_entropy_high_gap", "high_entropy_low_gap", "high_entropy_high_gap")
    kept = np.isin(quadrants, [QUADRANTS.index(name) for name in kept_names])
    dropped = batch.mask.numpy() & ~kept
    assert kept.any() and dropped.any()
    expected = tokenwise.per_token(batch, _vanilla) * kept
    assert_close(out.per_token_loss, expected, ulps=REORDERED)
    # Dropped tokens still count: token_mean divides by every valid token.
    out_token_mean = batch_loss(
        build_objective("tip", keep=kept_names, reduction="token_mean"), batch
    )
    assert_close(out_token_mean.loss, expected.sum() / batch.mask.sum().item(), ulps=REORDERED)


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_exopd_without_extrapolation_is_vanilla_reverse_kl_to_the_teacher(reduction):
    batch = random_batch(3, 5, 9, seed=24, lengths=[5, 3, 1])
    batch.student.requires_grad_(True)
    out = batch_loss(build_objective("exopd", extrapolation=1.0, reduction=reduction), batch)
    out.loss.backward()
    assert_close(out.per_token_loss, tokenwise.per_token(batch, _vanilla), ulps=REORDERED)
    assert_close(batch.student.grad, _vanilla_gradient(batch, reduction), ulps=REORDERED)


def test_exopd_is_reverse_kl_to_the_extrapolated_target():
    batch = random_batch(3, 5, 9, seed=25)
    out = batch_loss(build_objective("exopd", extrapolation=1.25, granularity="full"), batch)

    student, teacher, reference_logits = (
        x.numpy() for x in (batch.student, batch.teacher, batch.reference)
    )
    expected = np.zeros(batch.mask.shape)
    for b, t in zip(*np.nonzero(batch.mask.numpy())):
        # Q(v) proportional to T(v)^1.25 * R(v)^(-0.25).
        target = (
            reference.softmax(teacher[b, t]) ** 1.25
            * reference.softmax(reference_logits[b, t]) ** -0.25
        )
        expected[b, t] = reference.kl(reference.softmax(student[b, t]), target / target.sum())
    assert_close(out.per_token_loss, expected, ulps=REORDERED)
    assert torch.isfinite(out.loss)
