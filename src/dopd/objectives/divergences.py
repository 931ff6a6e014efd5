"""Divergence kernels: pure functions of log-probabilities on a shared support.

Every divergence in dopd is one member of the generalized Jensen-Shannon family

    JSD_beta(S, Q) = beta * KL(Q || M) + (1 - beta) * KL(S || M),   M = beta * Q + (1 - beta) * S

with ``S`` the trained student and ``Q`` the target (Agarwal et al., "On-Policy Distillation of
Language Models", GKD, arXiv 2306.13649). The end points are taken as the KL divergences they
approach up to scale: beta = 0 is forward KL(Q || S), beta = 1 is reverse KL(S || Q), and
beta = 0.5 is the symmetric Jensen-Shannon divergence.

Two granularities are written here:

* ``generalized_jsd`` — the exact divergence over a support of K entries (top-K or full vocab);
* ``sampled_token_surrogate`` — a policy-gradient surrogate on the sampled token ``y ~ S`` whose
  expected gradient equals the gradient of the named divergence (no baseline, no clipping).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

# Zero-probability entries (-inf log-probs: masked vocabulary, empty top-K slots) are floored to a
# finite value. exp(LOG_FLOOR) underflows to exactly 0 in float32 and float64, so such entries
# contribute exactly 0 and never produce the NaN of 0 * inf in the forward or backward pass.
LOG_FLOOR = -1.0e4

# Cap of log(Q(y) / S(y)) in the forward-KL surrogate; on-policy samples never reach it.
MAX_LOG_IMPORTANCE = 50.0

Divergence = Literal["forward_kl", "js", "reverse_kl", "gjsd"]
DIVERGENCES: tuple[Divergence, ...] = get_args(Divergence)
# The JSD_beta member each named divergence is; ``gjsd`` takes its beta as an option.
DIVERGENCE_BETA: dict[Divergence, float] = {"forward_kl": 0.0, "js": 0.5, "reverse_kl": 1.0}


def divergence_beta(divergence: Divergence, jsd_beta: float = 0.5) -> float:
    """The JSD_beta member a divergence name denotes (``gjsd`` takes ``jsd_beta``)."""
    return jsd_beta if divergence == "gjsd" else DIVERGENCE_BETA[divergence]


def _floor(logp: Tensor) -> Tensor:
    return logp.clamp_min(LOG_FLOOR)


def _kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(P || Q) summed over the last dim. ``[..., K], [..., K] -> [...]``."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def generalized_jsd(student_logp: Tensor, target_logp: Tensor, beta: float) -> Tensor:
    """Exact JSD_beta between student and target distributions over one support.

    Args:
        student_logp: ``[M, K]`` float, normalised log-probs of the student ``S`` (carries grad).
        target_logp: ``[M, K]`` float, normalised log-probs of the target ``Q`` (constant).
        beta: in [0, 1]; 0 forward KL(Q||S), 0.5 Jensen-Shannon, 1 reverse KL(S||Q).

    Returns:
        ``[M]`` float, one divergence value per row.
    """
    s, q = _floor(student_logp), _floor(target_logp)
    if beta == 0.0:
        return _kl(q, s)
    if beta == 1.0:
        return _kl(s, q)
    mixture = torch.logaddexp(s + math.log(1.0 - beta), q + math.log(beta))
    return beta * _kl(q, mixture) + (1.0 - beta) * _kl(s, mixture)


def sampled_token_surrogate(student_logp_y: Tensor, target_logp_y: Tensor, beta: float) -> Tensor:
    """Per-token surrogate ``sg(c(y)) * log S(y)`` whose expectation under ``y ~ S`` has the
    gradient of JSD_beta(S, Q).

    With ``d JSD_beta / d S(v) = (1 - beta) * (log S(v) - log M(v))`` for 0 < beta < 1 the
    coefficient is ``c = (1 - beta)(log S(y) - log M(y))``; reverse KL gives the familiar
    ``c = log S(y) - log Q(y)`` (vanilla OPD), and forward KL needs the importance weight
    ``c = -Q(y) / S(y)`` because the sample comes from S, not Q.

    Args:
        student_logp_y: ``[M]`` float, ``log S(y)`` of the sampled tokens (carries grad).
        target_logp_y: ``[M]`` float, ``log Q(y)`` of the same tokens (constant).
        beta: in [0, 1], as in ``generalized_jsd``.

    Returns:
        ``[M]`` float surrogate values; only their gradient is meaningful.
    """
    s, q = _floor(student_logp_y.detach()), _floor(target_logp_y.detach())
    if beta == 0.0:
        # The importance weight is capped at e^50 so that a token the student almost never
        # samples (rollout and loss disagreeing on temperature or masking) cannot overflow.
        coefficient = -(q - s).clamp_max(MAX_LOG_IMPORTANCE).exp()
    elif beta == 1.0:
        coefficient = s - q
    else:
        mixture = torch.logaddexp(s + math.log(1.0 - beta), q + math.log(beta))
        coefficient = (1.0 - beta) * (s - mixture)
    return coefficient * _floor(student_logp_y)


def truncated_importance_weights(
    train_logp_y: Tensor, rollout_logp_y: Tensor, cap: float
) -> Tensor:
    """Truncated importance weights ``min(pi_train(y) / pi_rollout(y), cap)``, detached.

    The rollout engine (e.g. vLLM) samples ``y`` from its own numerics of the student; a
    sampled-token surrogate multiplied by these weights has, up to the truncation, the gradient
    it would have under samples from the trainer's student (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training").

    Args:
        train_logp_y: ``[M]`` float, the trainer's ``log S(y)``.
        rollout_logp_y: ``[M]`` float, the engine's log-probability of the same tokens.
        cap: ``> 0``, the largest weight.

    Returns:
        ``[M]`` float in ``(0, cap]``.
    """
    log_ratio = train_logp_y.detach() - rollout_logp_y.to(train_logp_y.dtype)
    return log_ratio.clamp_max(math.log(cap)).exp()
