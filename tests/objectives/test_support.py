"""Top-K supports and restriction (dopd.objectives.support) against numpy references."""

import numpy as np
import pytest
import torch

from dopd.objectives.divergences import generalized_jsd
from dopd.objectives.support import restrict_to_support, topk_support
from tests.objectives import reference
from tests.tolerance import ANALYTIC, REORDERED, assert_close, log_prob_scale, tolerance

SOURCES = ["student", "teacher", "union"]
INF = float("inf")


def _logits(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2  # [M, V]
    target = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2  # [M, V]
    return student, target


def _support_probs(
    logp: torch.Tensor, index: torch.Tensor, valid: torch.Tensor
) -> dict[int, float]:
    """Vocabulary id -> probability of one row's valid support entries."""
    return {int(i): float(p) for i, p, ok in zip(index, logp.exp(), valid) if ok}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("k", [1, 3, 7, 50])
def test_topk_support_matches_reference(source, k, seed):
    vocab = 7
    student, target = _logits(5, vocab, seed)
    index, valid = topk_support(student, target, k, source)
    width = min(k, vocab) * (2 if source == "union" else 1)
    assert index.shape == valid.shape == (5, width)
    assert index.dtype == torch.long and valid.dtype == torch.bool
    for row in range(5):
        ids = index[row][valid[row]].tolist()
        assert len(ids) == len(set(ids)), "a vocabulary id is counted twice"
        assert sorted(ids) == reference.support_ids(student[row], target[row], k, source)


def test_k_above_vocabulary_means_whole_vocabulary(seed):
    student, target = _logits(4, 6, seed)
    index, valid = topk_support(student, target, 1000, "student")
    assert valid.all() and (index.sort(-1).values == torch.arange(6)).all()
    logp = restrict_to_support(student, index, valid, tail=False)
    assert_close(logp.exp(), student.softmax(-1).gather(-1, index), ulps=REORDERED)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("tail", [False, True])
def test_restrict_to_support_matches_reference(source, tail, seed):
    student, target = _logits(4, 9, seed)
    index, valid = topk_support(student, target, 3, source)
    for logits in (student, target):
        logp = restrict_to_support(logits, index, valid, tail)
        assert logp.shape[-1] == index.shape[-1] + tail
        assert_close(logp.exp().sum(-1), torch.ones(4, dtype=torch.float64), ulps=REORDERED)
        for row in range(4):
            support = reference.support_ids(student[row], target[row], 3, source)
            expected = reference.restricted_probs(logits[row], support, tail)
            got = _support_probs(logp[row, : index.shape[-1]], index[row], valid[row])
            # The tail entry joins the row's comparison: it is 1 minus the support's mass, so its
            # rounding is that of the row's largest probabilities, not of its own (small) size.
            tail_mass = [logp[row, -1].exp().item()] if tail else []
            assert_close(np.array([got[i] for i in support] + tail_mass), expected, ulps=REORDERED)
            assert (logp[row, : index.shape[-1]][~valid[row]] == -INF).all()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_divergence_value_and_gradient_match_reference(source, tail, beta, seed):
    student, target = _logits(4, 8, seed)
    student.requires_grad_(True)
    index, valid = topk_support(student, target, 3, source)
    values = generalized_jsd(
        restrict_to_support(student, index, valid, tail),
        restrict_to_support(target, index, valid, tail),
        beta,
    )
    values.sum().backward()
    for row in range(4):
        support = reference.support_ids(student[row].detach(), target[row], 3, source)
        value, grad = reference.support_divergence(
            student[row].detach(), target[row], support, tail, beta
        )
        # Rounding follows the log-probabilities that enter, not the (possibly tiny) result.
        terms = log_prob_scale(student[row], target[row])
        assert_close(values[row], value, ulps=ANALYTIC, scale=terms)
        assert_close(student.grad[row], grad, ulps=ANALYTIC, scale=terms)


@pytest.mark.parametrize("tail", [False, True])
def test_restrict_to_support_passes_gradcheck(tail, seed):
    student, target = _logits(3, 5, seed)
    index, valid = topk_support(student, target, 2, "union")
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: restrict_to_support(x, index, valid, tail), (student,)
    )


def test_tail_stays_finite_when_support_holds_all_mass(seed):
    student, target = _logits(3, 4, seed)
    student.requires_grad_(True)
    index, valid = topk_support(student, target, 4, "student")
    logp = restrict_to_support(student, index, valid, tail=True)
    generalized_jsd(
        logp, restrict_to_support(target, index, valid, tail=True), 1.0
    ).sum().backward()
    # The tail holds what the support misses of a total mass of 1: zero up to rounding of 1.
    assert torch.isfinite(logp).all() and logp[:, -1].exp().max() <= tolerance(1.0, 1.0, REORDERED)
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_support_without_any_mass_gives_finite_values_and_gradients(source, tail, beta):
    """The target gives the student's whole top-2 zero mass, and the student gives the target's
    whole top-2 zero mass: -inf at every gathered entry must not become NaN."""
    student = torch.tensor(
        [[5.0, 4.0, -INF, -INF, 0.0, 0.0]], dtype=torch.float64, requires_grad=True
    )
    target = torch.tensor([[-INF, -INF, 9.0, 9.0, 2.0, 3.0]], dtype=torch.float64)
    index, valid = topk_support(student, target, 2, source)
    student_logp = restrict_to_support(student, index, valid, tail)
    target_logp = restrict_to_support(target, index, valid, tail)
    values = generalized_jsd(student_logp, target_logp, beta)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(student.grad).all()
    assert not student_logp.isnan().any() and not target_logp.isnan().any()
