"""dopd.lab.stats: the paired bootstrap against closed forms and its coverage by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dopd.lab.stats import paired_bootstrap
from tests.tolerance import REORDERED, assert_close


def test_identical_methods_differ_by_exactly_zero():
    correct = np.random.default_rng(0).random((3, 100)) < 0.6
    interval = paired_bootstrap(correct, correct)
    assert (interval.diff, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_a_constant_per_problem_difference_has_a_point_interval():
    # One seed of the first method solves every problem, the other none; the second method solves
    # none: every problem differs by 0.5, and so does every resample.
    first = np.stack([np.ones(64, dtype=bool), np.zeros(64, dtype=bool)])
    interval = paired_bootstrap(first, np.zeros(64, dtype=bool))
    assert interval.diff == 0.5
    assert_close(interval.low, 0.5, ulps=REORDERED)
    assert_close(interval.high, 0.5, ulps=REORDERED)


@settings(max_examples=40, deadline=None)
@given(
    seeds=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    problems=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_diff_is_the_difference_of_seed_averaged_accuracies(seeds, problems, seed):
    rng = np.random.default_rng(seed)
    first, second = (rng.random((count, problems)) < 0.5 for count in seeds)
    interval = paired_bootstrap(first, second, resamples=200)
    expected = first.mean(axis=0).mean() - second.mean(axis=0).mean()
    assert_close(interval.diff, expected, ulps=REORDERED)
    assert interval.low <= interval.high
    assert -1.0 <= interval.low and interval.high <= 1.0


def test_half_width_matches_the_normal_approximation_for_many_problems():
    # Independent reference: for N = 2000 paired differences the percentile interval is close to
    # mean +- 1.96 sd / sqrt(N).
    rng = np.random.default_rng(1)
    first, second = rng.random(2000) < 0.6, rng.random(2000) < 0.5
    interval = paired_bootstrap(first, second, resamples=20_000)
    differences = first.astype(float) - second.astype(float)
    half_width = 1.959964 * differences.std(ddof=1) / np.sqrt(differences.size)
    assert abs((interval.high - interval.low) / 2 - half_width) < 0.05 * half_width
    assert abs((interval.high + interval.low) / 2 - differences.mean()) < 0.1 * half_width


def test_95_percent_intervals_cover_the_true_difference_about_95_percent_of_the_time():
    # Two methods that solve each of 300 problems with probabilities 0.6 and 0.5, correlated
    # through a shared difficulty; the true difference is 0.1.
    rng = np.random.default_rng(2)
    covered = 0
    trials = 1000
    for trial in range(trials):
        difficulty = rng.random(300)
        first = difficulty < 0.6
        second = difficulty + 0.2 * (rng.random(300) - 0.5) < 0.5
        truth = 0.6 - 0.5
        interval = paired_bootstrap(first, second, resamples=1000, seed=trial)
        covered += interval.low <= truth <= interval.high
    # Binomial(1000, 0.95) has sd 0.007: 0.93-0.97 is about 3 sd each side (seeded, so fixed).
    assert 0.93 <= covered / trials <= 0.97


def test_deterministic_by_seed_and_rejects_unpaired_inputs():
    rng = np.random.default_rng(3)
    first, second = rng.random((2, 50)) < 0.5, rng.random((2, 50)) < 0.4
    assert paired_bootstrap(first, second, seed=5) == paired_bootstrap(first, second, seed=5)
    with pytest.raises(ValueError, match="same problems; got 50 and 49"):
        paired_bootstrap(first, second[:, :49])
    with pytest.raises(ValueError, match="at least one problem"):
        paired_bootstrap(np.zeros((1, 0)), np.zeros((1, 0)))
    with pytest.raises(ValueError, match="confidence=1.5"):
        paired_bootstrap(first, second, confidence=1.5)
