"""Run a per-token numpy reference over the valid positions of a batch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tests.objectives import reference


def per_token(batch, value: Callable[..., float], target: str = "teacher") -> np.ndarray:
    """``[B, T]`` of ``value(student_row, target_row, token)`` at valid positions, 0 elsewhere."""
    views = {
        name: getattr(batch, name).detach().double().numpy()
        for name in ("student", "priv_student", "teacher", "reference")
    }
    ids, mask = batch.ids.numpy(), batch.mask.numpy()
    out = np.zeros(mask.shape)
    for b, t in zip(*np.nonzero(mask)):
        out[b, t] = value(views["student"][b, t], views[target][b, t], int(ids[b, t]))
    return out


def sampled_surrogate(beta: float) -> Callable[..., float]:
    """``c(y) log S(y)`` for the sampled-token surrogate of JSD_beta."""

    def value(student, target, token):
        s_y, q_y = reference.softmax(student)[token], reference.softmax(target)[token]
        return reference.surrogate_coefficient(s_y, q_y, beta) * np.log(s_y)

    return value


def support_divergence(
    beta: float, k: int, source: str = "student", tail: bool = False
) -> Callable[..., float]:
    """JSD_beta over a top-K support (renormalised, or with a tail entry)."""

    def value(student, target, token):
        support = reference.support_ids(student, target, k, source)
        return reference.support_divergence(student, target, support, tail, beta)[0]

    return value


def full_divergence(beta: float) -> Callable[..., float]:
    """JSD_beta over the whole vocabulary."""
    return lambda student, target, token: reference.full_divergence(student, target, beta)[0]
