"""Divergence kernels (dopd.objectives.divergences) against hand-written float64 references."""

import math

import numpy as np
import pytest
import torch

from dopd.objectives.divergences import divergence_beta, generalized_jsd, sampled_token_surrogate
from tests.objectives import reference
from tests.tolerance import ANALYTIC, REORDERED, assert_close, log_prob_scale, tolerance

BETAS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
INF = float("inf")


def _random_logits(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2  # [M, V]
    target = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2  # [M, V]
    return student, target


def _logp(probs) -> torch.Tensor:
    """Log-probabilities of hand-written probabilities (0 becomes -inf)."""
    return torch.tensor(probs, dtype=torch.float64).log()


@pytest.mark.parametrize("beta", BETAS)
def test_generalized_jsd_value_and_gradient_match_reference(beta, seed):
    student, target = _random_logits(6, 9, seed)
    student.requires_grad_(True)
    values = generalized_jsd(student.log_softmax(-1), target.log_softmax(-1), beta)  # [M]
    values.sum().backward()
    for row in range(student.shape[0]):
        s, q = reference.softmax(student[row].detach()), reference.softmax(target[row])
        # A divergence near zero is a sum of log-probability terms that cancel: its rounding, and
        # its gradient's, follows the largest log-probability that enters, not the result.
        terms = log_prob_scale(student[row], target[row])
        assert_close(values[row], reference.gjsd(s, q, beta), ulps=ANALYTIC, scale=terms)
        expected_grad = reference.softmax_backward(s, reference.gjsd_prob_grad(s, q, beta))
        assert_close(student.grad[row], expected_grad, ulps=ANALYTIC, scale=terms)


@pytest.mark.parametrize("beta", BETAS)
def test_generalized_jsd_passes_gradcheck(beta, seed):
    student, target = _random_logits(3, 4, seed)
    student.requires_grad_(True)
    target_logp = target.log_softmax(-1)
    assert torch.autograd.gradcheck(
        lambda s: generalized_jsd(s.log_softmax(-1), target_logp, beta), (student,)
    )


def test_divergence_names_map_to_family_members():
    assert divergence_beta("forward_kl") == 0.0
    assert divergence_beta("js") == 0.5
    assert divergence_beta("reverse_kl") == 1.0
    assert divergence_beta("gjsd", 0.3) == 0.3


def test_forward_and_reverse_kl_differ_and_are_named_correctly():
    # S = (0.9, 0.1), Q = (0.5, 0.5): KL(S||Q) and KL(Q||S) by hand.
    student, target = _logp([[0.9, 0.1]]), _logp([[0.5, 0.5]])
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    forward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert_close(generalized_jsd(student, target, 1.0).item(), reverse, ulps=REORDERED)
    assert_close(generalized_jsd(student, target, 0.0).item(), forward, ulps=REORDERED)
    assert abs(forward - reverse) > 0.1


def test_reverse_kl_is_huge_where_student_has_mass_the_target_lacks():
    # S = (1/2, 1/2, 0), Q = (1, 0, 0): KL(Q||S) = log 2, KL(S||Q) is infinite (floored, finite).
    student, target = _logp([[0.5, 0.5, 0.0]]), _logp([[1.0, 0.0, 0.0]])
    forward = generalized_jsd(student, target, 0.0).item()
    reverse = generalized_jsd(student, target, 1.0).item()
    assert_close(forward, math.log(2.0), ulps=REORDERED)
    assert math.isfinite(reverse) and reverse > 1000.0
    # Swapping the distributions swaps the names: KL(Q||S) is the reverse KL of (Q, S).
    assert_close(generalized_jsd(target, student, 1.0).item(), forward, ulps=REORDERED)


@pytest.mark.parametrize("beta", BETAS)
def test_swapping_arguments_mirrors_beta(beta, seed):
    student, target = _random_logits(5, 6, seed)
    s, q = student.log_softmax(-1), target.log_softmax(-1)
    assert_close(generalized_jsd(s, q, beta), generalized_jsd(q, s, 1.0 - beta), ulps=ANALYTIC)


def test_js_is_bounded_by_log_two_and_zero_on_equal_distributions(seed):
    student, target = _random_logits(8, 5, seed)
    s, q = student.log_softmax(-1), target.log_softmax(-1)
    js = generalized_jsd(s, q, 0.5)
    assert (js > 0).all() and (js <= math.log(2.0)).all()
    # Zero up to the rounding of the log-probabilities that enter (the value itself is no scale).
    assert generalized_jsd(s, s, 0.5).abs().max().item() <= tolerance(s, s, REORDERED)


@pytest.mark.parametrize("beta", BETAS)
def test_minus_inf_log_probs_give_finite_values_and_gradients(beta):
    student = torch.tensor(
        [[0.3, -INF, 1.0, -INF], [-INF, 2.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True
    )
    target = torch.tensor([[1.0, -INF, -INF, 0.5], [0.0, -INF, 1.0, 2.0]], dtype=torch.float64)
    values = generalized_jsd(student.log_softmax(-1), target.log_softmax(-1), beta)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(student.grad).all()
    assert (student.grad[student.isinf()] == 0).all()


@pytest.mark.parametrize("beta", BETAS)
def test_sampled_surrogate_value_and_gradient(beta, seed):
    student, target = _random_logits(7, 5, seed)
    ids = torch.randint(0, 5, (7, 1), generator=torch.Generator().manual_seed(seed))
    student_logp_y = student.log_softmax(-1).gather(-1, ids).squeeze(-1).requires_grad_(True)  # [M]
    target_logp_y = target.log_softmax(-1).gather(-1, ids).squeeze(-1)  # [M]
    values = sampled_token_surrogate(student_logp_y, target_logp_y, beta)
    values.sum().backward()
    s_y, q_y = student_logp_y.detach().exp().numpy(), target_logp_y.exp().numpy()
    coefficient = np.array([reference.surrogate_coefficient(a, b, beta) for a, b in zip(s_y, q_y)])
    assert_close(values, coefficient * np.log(s_y), ulps=ANALYTIC)
    # Stop-gradient on the coefficient: d/d log S(y) is the coefficient alone.
    assert_close(student_logp_y.grad, coefficient, ulps=ANALYTIC)


MC_SAMPLES = 200_000
MC_SIGMAS = 5.0


@pytest.mark.parametrize(
    "name,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("js", 0.5), ("gjsd", 0.3)]
)
def test_sampled_surrogate_mean_gradient_matches_exact_gradient(name, beta):
    """Monte Carlo: E_{y~S}[grad surrogate] = grad JSD_beta(S, Q), within MC_SIGMAS standard
    errors."""
    student_logits = torch.tensor(
        [0.5, -0.3, 1.2, 0.0, -1.0], dtype=torch.float64, requires_grad=True
    )
    target_logits = torch.tensor([-0.2, 0.8, 0.3, -1.0, 0.6], dtype=torch.float64)
    student_probs = reference.softmax(student_logits.detach())
    target_probs = reference.softmax(target_logits)
    generator = torch.Generator().manual_seed(7)
    student_probs_tensor = torch.from_numpy(student_probs)
    samples = torch.multinomial(student_probs_tensor, MC_SAMPLES, True, generator=generator)  # [n]

    student_logp_y = student_logits.log_softmax(-1)[samples]
    target_logp_y = target_logits.log_softmax(-1)[samples]
    sampled_token_surrogate(
        student_logp_y, target_logp_y, divergence_beta(name, beta)
    ).mean().backward()

    # Standard error from per-sample gradients c(y) (e_y - S), written independently.
    coefficient = np.array(
        [reference.surrogate_coefficient(student_probs[y], target_probs[y], beta) for y in range(5)]
    )
    ids = samples.numpy()
    per_sample = coefficient[ids, None] * (np.eye(5)[ids] - student_probs)  # [n, V]
    standard_error = per_sample.std(0) / math.sqrt(MC_SAMPLES)
    exact = reference.softmax_backward(
        student_probs, reference.gjsd_prob_grad(student_probs, target_probs, beta)
    )
    assert np.abs(exact).max() > 10 * MC_SIGMAS * standard_error.max(), (
        "test cannot tell a wrong gradient apart"
    )
    assert np.all(np.abs(student_logits.grad.numpy() - exact) <= MC_SIGMAS * standard_error)


def test_forward_kl_surrogate_stays_finite_for_improbable_sampled_tokens():
    # A sampled token the student gives probability e^-95 (e.g. rollout and loss disagree on the
    # masked vocabulary or temperature): exp(log Q(y) - log S(y)) overflows float32.
    student_logp_y = torch.tensor([-95.0], requires_grad=True)
    values = sampled_token_surrogate(student_logp_y, torch.tensor([math.log(0.5)]), 0.0)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(student_logp_y.grad).all()
