"""Privilege statistics and step thresholds (dopd.objectives.statistics)."""

import math

import numpy as np
import pytest
import torch

from dopd import DOPDConfig, compute_thresholds, dopd_loss, merge_statistics, privilege_statistics
from dopd.objectives.statistics import trimmed_mean
from tests.objectives import reference
from tests.objectives.batches import random_batch
from tests.tolerance import REORDERED, assert_close

INF = float("inf")


def _sampled_logp(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` log-prob of each valid sampled token, row-major over the valid positions."""
    return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)[mask]


def _step_statistics(batch):
    return privilege_statistics(
        _sampled_logp(batch.priv_student, batch.ids, batch.mask),
        _sampled_logp(batch.teacher, batch.ids, batch.mask),
    )


def test_privilege_statistics_match_hand_formulas(seed):
    priv_logp = torch.log(torch.tensor([0.5, 0.1, 0.9, 0.3], dtype=torch.float64)).requires_grad_(
        True
    )
    teacher_logp = torch.log(
        torch.tensor([0.25, 0.1, 0.3, 0.6], dtype=torch.float64)
    ).requires_grad_(True)
    statistics = privilege_statistics(priv_logp, teacher_logp)
    expected_gap = [math.log(2.0), 0.0, math.log(3.0), math.log(2.0)]
    assert_close(statistics["advantage_gap"], np.array(expected_gap), ulps=REORDERED)
    assert_close(statistics["q_student"], np.array([0.5, 0.1, 0.9, 0.3]), ulps=REORDERED)
    assert_close(statistics["q_teacher"], np.array([0.25, 0.1, 0.3, 0.6]), ulps=REORDERED)
    assert not any(value.requires_grad for value in statistics.values())


def test_privilege_statistics_stay_finite_for_zero_probability_tokens():
    statistics = privilege_statistics(torch.tensor([0.0, -INF]), torch.tensor([-INF, -INF]))
    assert all(torch.isfinite(value).all() for value in statistics.values())
    assert statistics["advantage_gap"][1] == 0 and statistics["q_teacher"][0] == 0


def test_trimmed_mean_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64)
    # 0.95 quantile, linear: 4 + 0.8 * (100 - 4) = 80.8, so only 100 is dropped.
    assert trimmed_mean(values, 0.95).item() == 2.5
    assert trimmed_mean(values, 1.0).item() == 22.0
    # 0.5 quantile = 3: ties at the cutoff are kept.
    assert trimmed_mean(values, 0.5).item() == 2.0
    assert trimmed_mean(values[:0], 0.95).item() == 0.0


@pytest.mark.parametrize("trim_quantile", [0.1, 0.5, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trimmed_mean_matches_numpy_linear_quantile(trim_quantile, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(37, generator=generator, dtype=torch.float64).to(dtype)
    values[5] = values[6] = values[7]  # ties
    got = trimmed_mean(values, trim_quantile)
    assert got.dtype == dtype
    expected = reference.trimmed_mean(values.double().numpy(), trim_quantile)
    assert_close(got, expected, ulps=REORDERED)


@pytest.mark.parametrize("trim_quantile", [0.5, 0.95, 1.0])
def test_thresholds_identical_from_whole_batch_and_merged_micro_batches(trim_quantile):
    batch = random_batch(8, 5, 11, seed=3, lengths=[5, 1, 3, 0, 5, 2, 4, 5])
    config = DOPDConfig(top_k=4, trim_quantile=trim_quantile)
    whole = dopd_loss(
        batch.student, batch.priv_student, batch.teacher, batch.ids, batch.mask, config
    ).thresholds

    parts = [_step_statistics(batch.rows(start, start + 2)) for start in range(0, 8, 2)]
    merged = compute_thresholds(merge_statistics(parts), trim_quantile)
    from_parts = compute_thresholds(parts, trim_quantile)

    gap, q_student, q_teacher = reference.DOPDReference().statistics(*batch.numpy()[1:])
    expected = [
        reference.trimmed_mean(values, trim_quantile) for values in (gap, q_student, q_teacher)
    ]
    for name, value in zip(("A", "q_student", "q_teacher"), expected):
        assert torch.equal(getattr(whole, name), getattr(merged, name))
        assert torch.equal(getattr(whole, name), getattr(from_parts, name))
        assert_close(getattr(whole, name), value, ulps=REORDERED)


def test_thresholds_do_not_depend_on_micro_batch_order():
    batch = random_batch(6, 4, 9, seed=5)
    parts = [_step_statistics(batch.rows(start, start + 2)) for start in range(0, 6, 2)]
    forward, backward = compute_thresholds(parts, 0.95), compute_thresholds(parts[::-1], 0.95)
    for name in ("A", "q_student", "q_teacher"):
        assert_close(getattr(forward, name), getattr(backward, name), ulps=REORDERED)


def test_merge_statistics_concatenates_key_by_key():
    parts = [
        {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])},
        {"a": torch.tensor([5.0]), "b": torch.tensor([6.0])},
    ]
    merged = merge_statistics(parts)
    assert merged["a"].tolist() == [1.0, 2.0, 5.0] and merged["b"].tolist() == [3.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="at least one"):
        merge_statistics([])
