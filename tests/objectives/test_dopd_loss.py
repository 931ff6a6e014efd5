"""dopd_loss (dopd.objectives.dopd) end to end against the numpy reference DOPD of reference.py."""

import math

import numpy as np
import pytest
import torch

from dopd import DOPDConfig, compute_thresholds, dopd_loss, merge_statistics
from dopd.errors import ConfigError
from dopd.objectives.reduction import loss_denominator
from dopd.objectives.routing import HS, HT, LH, LL, REGIMES
from tests.objectives import reference
from tests.objectives.batches import random_batch
from tests.tolerance import ANALYTIC, REORDERED, assert_close

INF = float("inf")
BETAS = {"beta_light": 0.7, "beta_weak": 0.2, "beta_deep": 1.3}
WEIGHTS = {LH: 0.7, LL: 0.2, HT: 1.3, HS: 0.7}


def _run(batch, config, thresholds=None, denominator=None):
    return dopd_loss(
        batch.student,
        batch.priv_student,
        batch.teacher,
        batch.ids,
        batch.mask,
        config,
        thresholds,
        denominator=denominator,
    )


def _reference(config: DOPDConfig) -> reference.DOPDReference:
    return reference.DOPDReference(
        beta_light=config.beta_light,
        beta_weak=config.beta_weak,
        beta_deep=config.beta_deep,
        top_k=config.top_k,
        source=config.topk_support,
        tail=config.topk_tail,
        trim_quantile=config.trim_quantile,
        regimes=[REGIMES.index(r) for r in config.regimes],
        reduction=config.reduction,
    )


def _all_regimes_batch():
    """4 sequences (one empty) whose 14 valid tokens fall in every regime (4 LH, 4 LL, 2 HT,
    4 HS)."""
    batch = random_batch(4, 6, 11, seed=2, lengths=[6, 3, 0, 5])
    batch.student.requires_grad_(True)
    return batch


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
@pytest.mark.parametrize(
    "source,tail", [("student", False), ("teacher", False), ("union", False), ("student", True)]
)
def test_loss_gradient_and_regimes_match_reference(reduction, source, tail):
    batch = _all_regimes_batch()
    config = DOPDConfig(top_k=4, topk_support=source, topk_tail=tail, reduction=reduction, **BETAS)
    out = _run(batch, config)
    out.loss.backward()
    loss, grad, regimes, per_token = _reference(config)(*batch.numpy())
    assert set(regimes[regimes >= 0]) == {LH, LL, HT, HS}, "the batch must exercise every regime"
    assert_close(out.loss, loss, ulps=ANALYTIC)
    assert_close(batch.student.grad, grad, ulps=ANALYTIC)
    np.testing.assert_array_equal(out.regimes.numpy(), regimes)
    assert_close(out.per_token_loss, per_token, ulps=ANALYTIC)


def test_each_regime_gets_its_weight_times_its_divergence():
    batch = _all_regimes_batch()
    config = DOPDConfig(top_k=4, **BETAS)
    out = _run(batch, config)
    regimes = _reference(config)(*batch.numpy())[2]
    np.testing.assert_array_equal(out.regimes.numpy(), regimes)
    assert set(regimes[regimes >= 0]) == {LH, LL, HT, HS}
    student, priv, teacher, _, mask = batch.numpy()
    for b, t in zip(*np.nonzero(mask)):
        r = int(regimes[b, t])
        if r == HT:
            divergence, _ = reference.full_divergence(student[b, t], teacher[b, t], reference.JS)
        else:
            target = teacher[b, t] if r == LH else priv[b, t]
            support = reference.topk_ids(student[b, t], 4)
            divergence, _ = reference.support_divergence(
                student[b, t], target, support, False, reference.REVERSE_KL
            )
        assert_close(
            out.per_token_loss[b, t], WEIGHTS[r] * divergence, ulps=ANALYTIC, msg=REGIMES[r]
        )


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_reductions_by_hand(reduction):
    batch = _all_regimes_batch()
    out = _run(batch, DOPDConfig(top_k=4, reduction=reduction))
    per_token, mask = out.per_token_loss.numpy(), batch.mask.numpy()
    if reduction == "token_mean":
        expected = per_token[mask].sum() / mask.sum()
    else:
        # Mean over the sequences with at least one valid token of their per-token means.
        expected = np.mean(
            [per_token[b][mask[b]].mean() for b in range(len(mask)) if mask[b].any()]
        )
    assert_close(out.loss, expected, ulps=REORDERED)


def test_gradient_reaches_student_logits_only():
    batch = _all_regimes_batch()
    batch.priv_student.requires_grad_(True)
    batch.teacher.requires_grad_(True)
    out = _run(batch, DOPDConfig(top_k=4))
    out.loss.backward()
    assert batch.student.grad is not None and batch.student.grad.abs().sum() > 0
    for constant in (batch.priv_student, batch.teacher):
        assert constant.grad is None or (constant.grad == 0).all()
    _, grad, _, _ = _reference(DOPDConfig(top_k=4))(*batch.numpy())
    assert_close(batch.student.grad, grad, ulps=REORDERED)


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_micro_batches_with_step_thresholds_and_denominator_sum_to_full_batch(reduction):
    batch = random_batch(8, 5, 11, seed=3, lengths=[5, 1, 3, 0, 5, 2, 4, 5])
    config = DOPDConfig(top_k=4, reduction=reduction, **BETAS)
    full_student = batch.student.clone().requires_grad_(True)
    full = dopd_loss(full_student, batch.priv_student, batch.teacher, batch.ids, batch.mask, config)
    full.loss.backward()

    batch.student.requires_grad_(True)
    micro_batches = [batch.rows(start, start + 2) for start in range(0, 8, 2)]
    statistics = [_run(part, config).statistics for part in micro_batches]
    step_thresholds = compute_thresholds(
        merge_statistics(
            {name: value[part.mask] for name, value in stats.items()}
            for stats, part in zip(statistics, micro_batches)
        ),
        config.trim_quantile,
    )
    denominator = sum(loss_denominator(part.mask, reduction) for part in micro_batches)
    total = 0.0
    for part in micro_batches:
        loss = _run(part, config, step_thresholds, denominator).loss
        loss.backward()
        total = total + loss.detach()

    assert_close(total, full.loss, ulps=REORDERED)
    assert_close(batch.student.grad, full_student.grad, ulps=REORDERED)
    # Not vacuous: at least one micro-batch's own thresholds differ from the step's.
    assert any(_run(part, config).thresholds.A != step_thresholds.A for part in micro_batches)


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_disabled_regimes_contribute_zero_but_count_in_denominator(reduction):
    batch = _all_regimes_batch()
    config = DOPDConfig(top_k=4, regimes=("LH", "HT"), reduction=reduction, **BETAS)
    out = _run(batch, config)
    out.loss.backward()
    loss, grad, regimes, per_token = _reference(config)(*batch.numpy())
    disabled = np.isin(regimes, [LL, HS])
    assert disabled.any() and (out.per_token_loss.numpy()[disabled] == 0).all()
    np.testing.assert_array_equal(out.regimes.numpy(), regimes)
    assert_close(out.loss, loss, ulps=REORDERED)
    assert_close(batch.student.grad, grad, ulps=REORDERED)
    if reduction == "token_mean":
        assert_close(out.loss, per_token.sum() / batch.mask.sum().item(), ulps=REORDERED)


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_fully_masked_batch_gives_zero_loss_and_zero_gradient(reduction):
    batch = random_batch(3, 4, 7, seed=1, lengths=[0, 0, 0])
    batch.student.requires_grad_(True)
    out = _run(batch, DOPDConfig(top_k=3, reduction=reduction))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert batch.student.grad is not None and (batch.student.grad == 0).all()
    assert (out.regimes == -1).all() and (out.advantage_gap == 0).all()
    assert all(math.isfinite(value) for value in out.metrics.values())


@pytest.mark.parametrize("source", ["student", "teacher", "union"])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("top_k", [2, 1000])
def test_minus_inf_logits_give_finite_loss_and_gradient(source, tail, top_k):
    batch = random_batch(3, 4, 6, seed=2)
    with torch.no_grad():
        batch.teacher[..., :2] = -INF  # a teacher with masked vocabulary (e.g. padding ids)
        batch.teacher[
            0, 0, batch.ids[0, 0]
        ] = -INF  # the sampled token itself impossible for the teacher
        batch.student[..., 5] = -INF
        batch.priv_student[1, :, 3:] = -INF
        batch.priv_student[2, 0, batch.ids[2, 0]] = -INF
    batch.student.requires_grad_(True)
    out = _run(batch, DOPDConfig(top_k=top_k, topk_support=source, topk_tail=tail))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(batch.student.grad).all()
    assert torch.isfinite(out.per_token_loss).all() and torch.isfinite(out.advantage_gap).all()
    assert all(math.isfinite(value) for value in out.metrics.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_compute_in_float32(dtype):
    batch = random_batch(2, 5, 9, seed=4, dtype=dtype)
    batch.student.requires_grad_(True)
    out = _run(batch, DOPDConfig(top_k=3))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.per_token_loss.dtype == torch.float32
    assert batch.student.grad.dtype == dtype
    # Upcasting first is all that happens: the same numbers as float32 inputs of the same values.
    upcast = random_batch(2, 5, 9, seed=4, dtype=dtype)
    upcast_out = dopd_loss(
        *(x.float() for x in (upcast.student, upcast.priv_student, upcast.teacher)),
        upcast.ids,
        upcast.mask,
        DOPDConfig(top_k=3),
    )
    assert torch.equal(out.loss.detach(), upcast_out.loss)
    assert torch.equal(out.regimes, upcast_out.regimes)


def test_float64_inputs_stay_float64():
    batch = random_batch(2, 5, 9, seed=4, dtype=torch.float64)
    out = _run(batch, DOPDConfig(top_k=3))
    assert out.loss.dtype == torch.float64 and out.advantage_gap.dtype == torch.float64
    assert out.thresholds.A.dtype == torch.float64


def test_output_shapes_statistics_and_metrics():
    batch = _all_regimes_batch()
    config = DOPDConfig(top_k=4)
    out = _run(batch, config)
    mask = batch.mask
    assert out.loss.shape == ()
    assert out.regimes.shape == (4, 6) and out.regimes.dtype == torch.long
    assert (out.regimes[~mask] == -1).all() and (
        (out.regimes[mask] >= 0) & (out.regimes[mask] <= 3)
    ).all()
    assert out.advantage_gap.shape == (4, 6) and (out.advantage_gap[~mask] == 0).all()

    gap, _, _ = reference.DOPDReference().statistics(*batch.numpy()[1:])
    assert_close(out.advantage_gap[mask], np.array(gap), ulps=REORDERED)

    expected_keys = {f"{kind}/{r}" for kind in ("fraction", "loss") for r in REGIMES}
    expected_keys |= {
        "threshold/A",
        "threshold/q_student",
        "threshold/q_teacher",
        "advantage_gap_mean",
    }
    assert set(out.metrics) == expected_keys
    assert all(type(value) is float for value in out.metrics.values())
    # Fractions are a long count over an int: true division gives float32, whatever the logits.
    fractions = sum(out.metrics[f"fraction/{r}"] for r in REGIMES)
    assert_close(fractions, 1.0, ulps=REORDERED, dtype=torch.float32)
    for index, name in enumerate(REGIMES):
        members = out.regimes == index
        fraction = members.sum().item() / mask.sum().item()
        assert_close(out.metrics[f"fraction/{name}"], fraction, ulps=REORDERED, dtype=torch.float32)
        assert_close(
            out.metrics[f"loss/{name}"], out.per_token_loss[members].mean(), ulps=REORDERED
        )
    assert out.metrics["threshold/A"] == out.thresholds.A.item()
    assert out.metrics["threshold/q_student"] == out.thresholds.q_student.item()
    assert out.metrics["threshold/q_teacher"] == out.thresholds.q_teacher.item()
    assert_close(out.metrics["advantage_gap_mean"], float(np.mean(gap)), ulps=REORDERED)


def test_loss_temperature_divides_every_view():
    batch = _all_regimes_batch()
    hot = _run(batch, DOPDConfig(top_k=4, temperature=2.0))
    batch_halved = random_batch(4, 6, 11, seed=2, lengths=[6, 3, 0, 5])
    for view in ("student", "priv_student", "teacher"):
        setattr(batch_halved, view, getattr(batch_halved, view) / 2.0)
    plain = _run(batch_halved, DOPDConfig(top_k=4))
    assert_close(hot.loss, plain.loss, ulps=REORDERED)
    assert torch.equal(hot.regimes, plain.regimes)


def test_completion_mask_may_be_zero_one_integers():
    batch = _all_regimes_batch()
    as_bool = _run(batch, DOPDConfig(top_k=4))
    batch.mask = batch.mask.long()
    as_int = _run(batch, DOPDConfig(top_k=4))
    assert as_bool.loss.item() == as_int.loss.item() and torch.equal(
        as_bool.regimes, as_int.regimes
    )


def test_mismatched_shapes_raise_value_error():
    batch = random_batch(2, 3, 5, seed=0)
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        dopd_loss(batch.student, batch.priv_student, batch.teacher[..., :4], batch.ids, batch.mask)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        dopd_loss(batch.student, batch.priv_student, batch.teacher, batch.ids[:, :2], batch.mask)


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"beta_weak": 0.6, "beta_light": 0.6}, "beta_weak"),
        ({"beta_weak": 0.7}, "beta_weak"),
        ({"beta_light": -0.1}, "beta_light"),
        ({"beta_deep": -1.0}, "beta_deep"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -3}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"trim_quantile": 0.0}, "trim_quantile"),
        ({"trim_quantile": -0.2}, "trim_quantile"),
        ({"trim_quantile": 1.5}, "trim_quantile"),
        ({"regimes": ("LH", "XX")}, "regimes"),
        ({"regimes": ("LH", "LH")}, "regimes"),
        ({"regimes": "LH"}, "regimes"),
        ({"topk_support": "both"}, "topk_support"),
        ({"reduction": "mean"}, "reduction"),
        ({"temperature": 0.0}, "temperature"),
        ({"fixed_divergence": "kl"}, "fixed_divergence"),
        ({"fixed_granularity": "dense"}, "fixed_granularity"),
    ],
)
def test_config_validation_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        DOPDConfig(**overrides)


def test_config_defaults_are_the_papers():
    config = DOPDConfig()
    assert (config.top_k, config.beta_light, config.beta_weak, config.beta_deep) == (
        128,
        0.6,
        0.3,
        1.0,
    )
    assert (config.trim_quantile, config.topk_support, config.topk_tail) == (0.95, "student", False)
    assert (config.reduction, config.temperature, config.regimes) == (
        "sequence_mean",
        1.0,
        ("LH", "LL", "HT", "HS"),
    )
    assert DOPDConfig(trim_quantile=1.0).trim_quantile == 1.0
    assert DOPDConfig(regimes=["HT"]).regimes == ("HT",)
