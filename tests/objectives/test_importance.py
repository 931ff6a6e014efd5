"""The truncated importance-sampling correction of sampled-token terms
(``importance_correction='truncated'``): the weight itself, its effect on the loss and its
gradient against a hand-written reference, the chunked path against the reference path, and the
errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dopd.errors import ConfigError
from dopd.objectives.base import objective_loss
from dopd.objectives.chunked import chunked_objective_loss
from dopd.objectives.divergences import truncated_importance_weights
from dopd.objectives.reduction import row_weights
from dopd.objectives.registry import build_objective
from dopd.objectives.views import ViewHead
from tests.tolerance import REORDERED, assert_close

finite = st.floats(-30.0, 0.0, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=20), st.floats(1.0, 10.0))
def test_weights_are_the_capped_probability_ratio(pairs, cap):
    train = torch.tensor([a for a, _ in pairs], dtype=torch.float64, requires_grad=True)
    rollout = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    weights = truncated_importance_weights(train, rollout, cap)
    expected = [min(torch.tensor(a - b, dtype=torch.float64).exp().item(), cap) for a, b in pairs]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))
    assert not weights.requires_grad  # a constant factor: no gradient flows through the ratio


def _batch(seed: int, batch: int = 3, length: int = 5, vocab: int = 11):
    generator = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64)
    ids = torch.randint(vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 3:] = False
    # The engine's log-probs: the trainer's own, moved by up to +-1.5 nats.
    shift = 3 * torch.rand(batch, length, generator=generator, dtype=torch.float64) - 1.5
    train = student.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return student.requires_grad_(), teacher, ids, mask, train + shift


@pytest.mark.parametrize("name", ["vanilla_opd", "priv_teacher_opd"])
@pytest.mark.parametrize("cap", [1.0, 2.0, 100.0])
def test_corrected_loss_weights_each_token_by_the_capped_ratio(name, cap):
    student, teacher, ids, mask, engine = _batch(seed=3)
    corrected = build_objective(name, importance_correction="truncated", importance_cap=cap)
    out = objective_loss(corrected, student, None, teacher, ids, mask, rollout_log_probs=engine)
    grad = torch.autograd.grad(out.loss, student)[0]
    # Reference by hand: sg(log S(y) - log T(y)) * w * log S(y), mean per sequence then over
    # sequences (the default reduction), w = min(S(y) / engine(y), cap).
    logp_s = student.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    logp_t = teacher.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    weight = (logp_s.detach() - engine).exp().clamp_max(cap)
    per_token = (logp_s.detach() - logp_t) * weight * logp_s * mask
    expected = (per_token.sum(-1) / mask.sum(-1)).mean()
    expected_grad = torch.autograd.grad(expected, student)[0]
    assert_close(out.loss, expected, ulps=REORDERED, scale=per_token.abs().max().item())
    assert_close(grad, expected_grad, ulps=REORDERED, scale=expected_grad.abs().max().item())


def test_engine_equal_to_trainer_changes_nothing_and_off_ignores_the_engine():
    student, teacher, ids, mask, engine = _batch(seed=5)
    train = student.detach().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    plain = build_objective("vanilla_opd")
    corrected = build_objective("vanilla_opd", importance_correction="truncated")
    base = objective_loss(plain, student, None, teacher, ids, mask).loss
    same = objective_loss(corrected, student, None, teacher, ids, mask, rollout_log_probs=train)
    ignored = objective_loss(plain, student, None, teacher, ids, mask, rollout_log_probs=engine)
    assert_close(same.loss, base, ulps=REORDERED, scale=base.abs().item() + 1.0)
    assert torch.equal(ignored.loss, base)


def test_chunked_path_applies_the_same_correction():
    generator = torch.Generator().manual_seed(9)
    tokens, width, vocab = 13, 6, 17
    hidden = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    head = torch.randn(vocab, width, generator=generator, dtype=torch.float64)
    teacher_hidden = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    teacher_head = torch.randn(vocab, width, generator=generator, dtype=torch.float64)
    ids = torch.randint(vocab, (tokens,), generator=generator)
    engine = -3 * torch.rand(tokens, generator=generator, dtype=torch.float64)
    objective = build_objective("vanilla_opd", importance_correction="truncated")
    hidden.requires_grad_()
    reference = objective_loss(
        objective,
        (hidden @ head.T).unsqueeze(0),
        None,
        (teacher_hidden @ teacher_head.T).unsqueeze(0),
        ids.unsqueeze(0),
        torch.ones(1, tokens, dtype=torch.bool),
        rollout_log_probs=engine.unsqueeze(0),
    )
    expected_grad = torch.autograd.grad(reference.loss, hidden)[0]
    mask = torch.ones(1, tokens, dtype=torch.bool)
    weights = row_weights(mask, "sequence_mean", None, dtype=torch.float64)
    chunked = chunked_objective_loss(
        objective,
        {"student": ViewHead(hidden, head), "teacher": ViewHead(teacher_hidden, teacher_head)},
        ids,
        weights,
        chunk_rows=4,
        rollout_log_probs=engine,
    )
    grad = torch.autograd.grad(chunked.loss, hidden)[0]
    scale = reference.per_token_loss.abs().max().item()
    assert_close(chunked.loss, reference.loss, ulps=REORDERED, scale=scale)
    assert_close(grad, expected_grad, ulps=REORDERED, scale=expected_grad.abs().max().item())


def test_correction_without_engine_log_probs_is_refused():
    student, teacher, ids, mask, _ = _batch(seed=1)
    corrected = build_objective("vanilla_opd", importance_correction="truncated")
    with pytest.raises(ValueError, match="rollout_log_probs"):
        objective_loss(corrected, student, None, teacher, ids, mask)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"importance_correction": "always"}, "importance_correction='always'"),
        ({"importance_cap": 0.5}, "importance_cap=0.5"),
    ],
)
def test_bad_options_name_the_key(options, match):
    with pytest.raises(ConfigError, match=match):
        build_objective("vanilla_opd", **options)
