"""Paired confidence intervals for the lab's method comparisons.

Two methods evaluated on the same held-out problems are compared problem by problem: what varies
between them is which problems each solves, and the sampling error of a difference in accuracy
is that of the per-problem differences, far smaller than the two accuracies' own errors when the
methods mostly agree. ``paired_bootstrap`` resamples problems with replacement — the same
resample for both methods and every seed — and reads the interval off the percentiles.

    interval = paired_bootstrap(dopd_correct, vanilla_correct)   # [S, N] each, one row per seed
    interval.diff, interval.low, interval.high
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A difference of mean accuracies and its confidence interval, all as fractions."""

    diff: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def paired_bootstrap(
    first,
    second,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """``mean(first) - mean(second)`` with a percentile bootstrap interval over problems.

    Args:
        first, second: ``[S, N]`` (or ``[N]``) bool or float per-problem correctness of two
            methods on the same ``N`` problems, one row per seed; the seed counts may differ,
            each method's rows are averaged first.
        resamples: bootstrap resamples of the ``N`` problems.
        confidence: the interval's coverage, in (0, 1).
        seed: the resampling generator's seed (the interval is a pure function of it).

    Returns:
        ``Interval`` of the difference in accuracy (fractions, not points).
    """
    first, second = _problem_means(first, "first"), _problem_means(second, "second")  # [N] each
    if first.shape != second.shape:
        raise ValueError(
            f"paired_bootstrap compares the same problems; got {first.size} and {second.size}"
        )
    if first.size == 0:
        raise ValueError("paired_bootstrap needs at least one problem")
    per_problem = first - second  # [N]
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, per_problem.size, size=(resamples, per_problem.size))  # [R, N]
    means = per_problem[rows].mean(axis=1)  # [R]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(per_problem.mean()), float(low), float(high))


def _problem_means(correct, name: str) -> np.ndarray:
    """``[N]`` float64 mean over seeds of ``[S, N]`` (or ``[N]``) correctness."""
    values = np.asarray(correct, dtype=np.float64)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(
            f"{name}: expected [seeds, problems] correctness, got shape {values.shape}"
        )
    return values.mean(axis=0)
