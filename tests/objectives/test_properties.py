"""Property-based tests (hypothesis) over shapes, masks, K, dtypes and -inf logits."""

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dopd import DOPDConfig, compute_thresholds, dopd_loss, merge_statistics
from dopd.objectives.reduction import loss_denominator
from dopd.objectives.registry import OBJECTIVES, build_objective
from tests.objectives.batches import Batch, batch_loss
from tests.tolerance import ANALYTIC, REORDERED, assert_close, tolerance

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@st.composite
def batches(draw) -> Batch:
    """Random views of shape [B, T, V] with an arbitrary mask, optional -inf logits, on-policy
    ids."""
    b, t, v = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 8))
    flags = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    mask = torch.tensor(flags).view(b, t)  # [B, T]
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 20.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # student, priv_student, teacher, reference: each [B, T, V]
    views = [
        torch.randn(b, t, v, generator=generator, dtype=torch.float64) * scale for _ in range(4)
    ]
    if draw(st.booleans()):
        # -inf in every view; the student keeps at least its top entry finite (a real distribution).
        for logits in views:
            drop = torch.rand(b, t, v, generator=generator) < 0.3
            drop &= logits < logits.amax(-1, keepdim=True)
            logits.masked_fill_(drop, -math.inf)
    student = views[0]
    probs = student.softmax(-1).view(-1, v)
    ids = torch.multinomial(probs, 1, generator=generator).view(b, t)  # [B, T]
    dtype = draw(st.sampled_from(DTYPES))
    return Batch(*(x.to(dtype) for x in views), ids, mask)


def divergence_slack(batch: Batch, compute: torch.dtype) -> float:
    """How far below zero a divergence (>= 0 exactly) may be evaluated: rounding of its log-ratio
    terms, which are as large as the logits, in the dtype it is computed in."""
    logits = torch.stack([batch.student, batch.priv_student, batch.teacher])  # [3, B, T, V]
    return tolerance(logits, 0.0, ANALYTIC, compute)


def _dopd(batch: Batch, config: DOPDConfig, **kwargs):
    return dopd_loss(
        batch.student, batch.priv_student, batch.teacher, batch.ids, batch.mask, config, **kwargs
    )


configs = st.builds(
    DOPDConfig,
    top_k=st.integers(1, 10),
    topk_support=st.sampled_from(["student", "teacher", "union"]),
    topk_tail=st.booleans(),
    reduction=st.sampled_from(["sequence_mean", "token_mean"]),
)


@PROPERTY_SETTINGS
@given(batch=batches(), config=configs)
def test_dopd_loss_is_finite_non_negative_and_routes_every_valid_token(batch, config):
    batch.student.requires_grad_(True)
    out = _dopd(batch, config)
    out.loss.backward()
    compute = torch.promote_types(batch.student.dtype, torch.float32)
    assert out.loss.dtype == compute and torch.isfinite(out.loss)
    assert torch.isfinite(batch.student.grad).all()
    slack = divergence_slack(batch, compute)
    assert out.loss.item() >= -slack
    assert (out.per_token_loss >= -slack).all()
    mask = batch.mask
    assert torch.equal(out.regimes == -1, ~mask)
    assert ((out.regimes[mask] >= 0) & (out.regimes[mask] <= 3)).all()
    fractions = sum(out.metrics[f"fraction/{r}"] for r in config.regimes)
    # Metrics are float32 summaries whatever the compute dtype.
    assert_close(fractions, 1.0 if mask.any() else 0.0, ulps=REORDERED, dtype=torch.float32)
    assert all(math.isfinite(value) for value in out.metrics.values())


@PROPERTY_SETTINGS
@given(batch=batches(), config=configs, cuts=st.lists(st.integers(0, 3), max_size=3))
def test_dopd_micro_batch_split_invariance(batch, config, cuts):
    """Micro-batches with the step's merged thresholds and summed denominator reproduce the full
    loss."""
    size = batch.ids.shape[0]
    full_student = batch.student.clone().requires_grad_(True)
    full = dopd_loss(full_student, batch.priv_student, batch.teacher, batch.ids, batch.mask, config)
    full.loss.backward()

    batch.student.requires_grad_(True)
    bounds = sorted({0, size, *(min(c, size) for c in cuts)})
    parts = [batch.rows(start, stop) for start, stop in itertools.pairwise(bounds)]
    statistics = [
        {k: v[part.mask] for k, v in _dopd(part, config).statistics.items()} for part in parts
    ]
    thresholds = compute_thresholds(merge_statistics(statistics), config.trim_quantile)
    denominator = sum(loss_denominator(part.mask, config.reduction) for part in parts)
    total = 0.0
    for part in parts:
        loss = _dopd(part, config, thresholds=thresholds, denominator=denominator).loss
        loss.backward()
        total += loss.item()

    # The loss averages per-token terms: its rounding follows the largest term.
    terms = full.per_token_loss.abs().max()
    dtype = full.loss.dtype
    assert_close(total, full.loss, ulps=REORDERED, dtype=dtype, scale=terms)
    assert_close(batch.student.grad, full_student.grad, ulps=REORDERED)


@PROPERTY_SETTINGS
@given(batch=batches(), name=st.sampled_from(sorted(OBJECTIVES)), top_k=st.integers(1, 10))
def test_every_objective_is_finite_and_divergences_are_non_negative(batch, name, top_k):
    batch.student.requires_grad_(True)
    objective = build_objective(name, top_k=top_k)
    out = batch_loss(objective, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(batch.student.grad).all()
    assert torch.equal(out.groups == -1, ~batch.mask)
    # Sampled-token surrogates are policy-gradient values, not divergences: no sign to check.
    if all(term.granularity != "sampled" for terms in objective.routes() for term in terms):
        slack = divergence_slack(batch, out.loss.dtype)
        assert out.loss.item() >= -slack and (out.per_token_loss >= -slack).all()
