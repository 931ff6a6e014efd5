"""The chunked loss (dopd.objectives.chunked) against the reference path, ``objective_loss`` on the
full logits ``hidden @ weight.T``: values, gradients, statistics and thresholds, for every entry of
the registry, every chunk size and both reductions."""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from dopd.objectives.base import objective_loss
from dopd.objectives.chunked import ChunkedOutput, chunked_objective_loss, chunked_statistics
from dopd.objectives.reduction import loss_denominator, reduce_loss, row_weights
from dopd.objectives.registry import OBJECTIVES, build_objective
from dopd.objectives.statistics import merge_statistics
from dopd.objectives.views import VIEW_NAMES, ViewHead
from tests.objectives.batches import cyclic_classes
from tests.tolerance import REORDERED, assert_close, log_prob_scale

# Shuffled routing permutes the labels within each call, i.e. within each chunk here: the paths
# agree on it only with one chunk (test_shuffled_routing_matches_reference_in_one_chunk).
NAMES = sorted(set(OBJECTIVES) - {"dopd_shuffled_routing"})
REDUCTIONS = ("sequence_mean", "token_mean")


@dataclass
class Rollout:
    """Hidden states ``[B, T, d_view]`` and heads ``[V, d_view]`` of every view, ids and mask
    ``[B, T]``.

    The privileged student reads the student's own head; the teacher has its own width.
    """

    hidden: dict[str, Tensor]
    heads: dict[str, Tensor]
    ids: Tensor
    mask: Tensor

    def logits(self, name: str) -> Tensor:
        """``[B, T, V]`` logits of view ``name``, as the model's head computes them."""
        return self.hidden[name] @ self.heads[name].T

    def view_heads(self, names=VIEW_NAMES) -> dict[str, ViewHead]:
        """``ViewHead`` of each view in ``names`` at the valid tokens (``[N, d]`` rows)."""
        return {name: ViewHead(self.hidden[name][self.mask], self.heads[name]) for name in names}

    def rows(self, start: int, stop: int) -> Rollout:
        """Sequences ``start:stop`` (a micro-batch); the heads are shared."""
        hidden = {name: value[start:stop] for name, value in self.hidden.items()}
        return Rollout(hidden, self.heads, self.ids[start:stop], self.mask[start:stop])


def random_rollout(
    batch, length, vocab, *, seed, dtype=torch.float64, lengths=None, width=16, teacher_extra=4
) -> Rollout:
    """Correlated views with logits of standard deviation ~3 and on-policy sampled ids, so that
    gaps range from tiny to large and every routing group is populated.

    The teacher is wider (``width + teacher_extra``): its logits are a per-token sharpened copy
    of the privileged student's plus noise from its extra dimensions.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64)

    student_hidden = normal(batch, length, width)  # [B, T, d]
    student_head = 3.0 * normal(vocab, width) / math.sqrt(width)  # [V, d]
    priv_student_hidden = student_hidden + uniform(batch, length, 1) * normal(
        batch, length, width
    )  # [B, T, d]
    sharpness = 0.5 + 1.5 * uniform(batch, length, 1)  # [B, T, 1]
    teacher_hidden = torch.cat(
        [sharpness * priv_student_hidden, normal(batch, length, teacher_extra)], -1
    )  # [B, T, d_T]
    teacher_head = torch.cat([student_head, normal(vocab, teacher_extra) / 2], -1)  # [V, d_T]
    hidden = {
        "student": student_hidden,
        "priv_student": priv_student_hidden,
        "teacher": teacher_hidden,
        "reference": student_hidden + 0.5 * normal(batch, length, width),
    }
    heads = {
        "student": student_head,
        "priv_student": student_head,
        "teacher": teacher_head,
        "reference": student_head + 0.3 * normal(vocab, width),
    }
    probs = (student_hidden @ student_head.T).softmax(-1).reshape(-1, vocab)
    ids = torch.multinomial(probs, 1, generator=generator).reshape(batch, length)  # [B, T]
    if lengths is None:
        lengths = torch.randint(0, length + 1, (batch,), generator=generator).tolist()
    mask = torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # [B, T]
    hidden = {name: value.to(dtype) for name, value in hidden.items()}
    heads = {name: value.to(dtype) for name, value in heads.items()}
    heads["priv_student"] = heads["student"]
    return Rollout(hidden, heads, ids, mask)


def _leaves(rollout: Rollout) -> tuple[Tensor, Tensor]:
    rollout.hidden["student"].requires_grad_(True)
    rollout.heads["student"].requires_grad_(True)
    return rollout.hidden["student"], rollout.heads["student"]


def _classes(objective, rollout: Rollout) -> Tensor | None:
    """``[B, T]`` token classes for an objective that routes on them, else None."""
    if not objective.uses_token_classes:
        return None
    return cyclic_classes(rollout.mask, len(objective.token_class_names))


def _reference(objective, rollout: Rollout, **kwargs):
    logits = {name: rollout.logits(name) for name in VIEW_NAMES}
    kwargs.setdefault("token_classes", _classes(objective, rollout))
    return objective_loss(
        objective,
        logits["student"],
        logits["priv_student"],
        logits["teacher"],
        rollout.ids,
        rollout.mask,
        reference_logits=logits["reference"],
        **kwargs,
    )


def _chunked(
    objective, rollout: Rollout, chunk_rows: int, *, denominator=None, **kwargs
) -> ChunkedOutput:
    mask = rollout.mask
    dtype = torch.promote_types(rollout.hidden["student"].dtype, torch.float32)
    classes = _classes(objective, rollout)
    kwargs.setdefault("token_classes", None if classes is None else classes[mask])
    return chunked_objective_loss(
        objective,
        rollout.view_heads(),
        rollout.ids[mask],
        row_weights(mask, objective.config.reduction, denominator, dtype=dtype),
        chunk_rows=chunk_rows,
        **kwargs,
    )


def _threshold_values(thresholds) -> list[Tensor]:
    if thresholds is None:
        return []
    if isinstance(thresholds, dict):
        return [torch.as_tensor(thresholds[key]) for key in sorted(thresholds)]
    return [torch.as_tensor(getattr(thresholds, f.name)) for f in dataclasses.fields(thresholds)]


def _assert_same(objective, rollout: Rollout, chunk_rows: int) -> None:
    """Chunked and reference paths agree on every output and on both gradients, to rounding of
    the same sums projected in chunks (see tests/tolerance.py)."""
    student_hidden, student_head = _leaves(rollout)
    reference = _reference(objective, rollout)
    expected_grads = torch.autograd.grad(reference.loss, (student_hidden, student_head))
    out = _chunked(objective, rollout, chunk_rows)
    grads = torch.autograd.grad(out.loss, (student_hidden, student_head))
    mask = rollout.mask
    # Per-token losses, statistics, thresholds and metrics are built from log-probabilities and
    # their differences (the gap, the sampled-token coefficient), and the loss averages per-token
    # terms of both signs: rounding follows the largest term or log-probability that enters, not
    # the (possibly cancelled) result.
    log_probs = max(
        [log_prob_scale(*rollout.logits(view).detach()[mask]) for view in rollout.hidden]
        if mask.any()
        else [0.0]
    )
    terms = reference.per_token_loss.abs().max().item()  # 0 at masked positions
    scale = max(terms, log_probs)
    assert_close(out.loss, reference.loss, ulps=REORDERED, scale=scale)
    # A gradient proportional to a cancelled difference (a sampled-token coefficient near zero)
    # carries that difference's absolute rounding: its relative rounding grows by scale / terms.
    conditioning = scale / terms if terms else 1.0
    for grad, expected in zip(grads, expected_grads):
        grad_scale = conditioning * expected.abs().max().item()
        assert_close(grad, expected, ulps=REORDERED, scale=grad_scale)
    expected = reference.per_token_loss[mask]
    assert_close(out.per_token_loss, expected, ulps=REORDERED, scale=scale)
    assert torch.equal(out.groups, reference.groups[mask])
    assert out.statistics.keys() == reference.statistics.keys()
    for name, value in out.statistics.items():
        # pruned_opd's key hashes the teacher log-prob's float bits, which any rounding difference
        # changes (a 1-row chunk is projected by GEMV, the batch by GEMM); it only routes
        # prune="random".
        if name != "prune_key":
            expected = reference.statistics[name][mask]
            assert_close(value, expected, ulps=REORDERED, scale=scale, msg=name)
    for value, expected in zip(
        _threshold_values(out.thresholds), _threshold_values(reference.thresholds), strict=True
    ):
        assert_close(value, expected, ulps=REORDERED, scale=scale)
    assert out.metrics.keys() == reference.metrics.keys()
    dtype = rollout.hidden["student"].dtype
    for key, value in out.metrics.items():
        assert_close(
            value, reference.metrics[key], ulps=REORDERED, dtype=dtype, scale=scale, msg=key
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_every_objective_matches_reference_in_float64(name, reduction):
    rollout = random_rollout(3, 8, 97, seed=1, lengths=[8, 0, 5])
    num_rows = int(rollout.mask.sum())
    objective = build_objective(name, top_k=8, temperature=0.7, reduction=reduction)
    for chunk_rows in (1, 7, num_rows, num_rows + 5):
        _assert_same(objective, rollout, chunk_rows)


@pytest.mark.parametrize("name", NAMES)
def test_every_objective_matches_reference_in_float32(name):
    rollout = random_rollout(2, 9, 211, seed=2, dtype=torch.float32, lengths=[9, 6])
    _assert_same(build_objective(name, top_k=16), rollout, 7)


def test_shuffled_routing_matches_reference_in_one_chunk():
    # One chunk draws the same permutation as the whole batch from the same RNG state.
    rollout = random_rollout(3, 8, 97, seed=1, lengths=[8, 0, 5])
    objective = build_objective("dopd_shuffled_routing", top_k=8, temperature=0.7)
    for chunk_rows in (13, 20):
        torch.manual_seed(5)
        expected = _reference(objective, rollout)
        torch.manual_seed(5)
        out = _chunked(objective, rollout, chunk_rows)
        assert torch.equal(out.groups, expected.groups[rollout.mask])
        assert_close(out.per_token_loss, expected.per_token_loss[rollout.mask], ulps=REORDERED)


def test_shuffled_routing_keeps_each_chunks_regime_counts():
    rollout = random_rollout(3, 8, 97, seed=1, lengths=[8, 0, 5])
    _leaves(rollout)
    gap = _chunked(build_objective("dopd", top_k=8), rollout, 4).groups
    torch.manual_seed(0)
    shuffled = _chunked(build_objective("dopd_shuffled_routing", top_k=8), rollout, 4).groups
    for start in range(0, gap.numel(), 4):
        rows = slice(start, start + 4)
        assert torch.equal(
            torch.bincount(shuffled[rows], minlength=4), torch.bincount(gap[rows], minlength=4)
        )
    assert not torch.equal(shuffled, gap)


def test_dopd_rollouts_populate_every_regime():
    # Guards the tests above: top-K and full-vocabulary terms both run in the chunked path.
    rollout = random_rollout(3, 8, 97, seed=1, lengths=[8, 0, 5])
    _leaves(rollout)
    groups = _chunked(build_objective("dopd", top_k=8, temperature=0.7), rollout, 7).groups
    assert set(groups.tolist()) == {0, 1, 2, 3}


def test_tied_head_gets_the_gradient_of_both_uses():
    generator = torch.Generator().manual_seed(3)
    vocab, width = 61, 16
    embedding = torch.randn(vocab, width, generator=generator, dtype=torch.float64).requires_grad_(
        True
    )  # [V, d], the head too
    mix = torch.randn(width, width, generator=generator, dtype=torch.float64) / 4  # [d, d]
    prompt_ids = torch.randint(0, vocab, (2, 6), generator=generator)  # [B, T]
    rollout = random_rollout(2, 6, vocab, seed=3, width=width, lengths=[6, 4])
    objective = build_objective("dopd", top_k=8)

    def tied_model_gradient(loss_of) -> Tensor:
        # A fresh forward per path: the embedding feeds the hidden states and is the head.
        rollout.hidden["student"] = torch.tanh(embedding[prompt_ids] @ mix)  # [B, T, d]
        rollout.heads["student"] = rollout.heads["priv_student"] = embedding
        return torch.autograd.grad(loss_of(), embedding)[0]

    expected = tied_model_gradient(lambda: _reference(objective, rollout).loss)
    grad = tied_model_gradient(lambda: _chunked(objective, rollout, 3).loss)
    assert_close(grad, expected, ulps=REORDERED)


@pytest.mark.parametrize("name", ["dopd", "tip", "pruned_opd"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_micro_batches_with_merged_statistics_sum_to_the_full_batch(name, reduction):
    rollout = random_rollout(4, 7, 83, seed=4, lengths=[7, 3, 0, 6])
    student_hidden, student_head = _leaves(rollout)
    objective = build_objective(name, top_k=8, reduction=reduction)
    reference = _reference(objective, rollout)
    expected_grads = torch.autograd.grad(reference.loss, (student_hidden, student_head))
    halves = [rollout.rows(0, 1), rollout.rows(1, 4)]
    statistics = merge_statistics(_statistics(objective, half, chunk_rows=2) for half in halves)
    for key, value in statistics.items():
        if key != "prune_key":  # see _assert_same
            assert_close(value, reference.statistics[key][rollout.mask], ulps=REORDERED)
    thresholds = objective.thresholds(statistics)
    denominator = sum(loss_denominator(half.mask, reduction) for half in halves)
    loss = sum(
        _chunked(objective, half, 2, denominator=denominator, thresholds=thresholds).loss
        for half in halves
    )
    assert_close(loss, reference.loss, ulps=REORDERED)
    for grad, expected in zip(
        torch.autograd.grad(loss, (student_hidden, student_head)), expected_grads
    ):
        assert_close(grad, expected, ulps=REORDERED)


def _statistics(objective, rollout: Rollout, chunk_rows: int) -> dict[str, Tensor]:
    views = ("student", "priv_student", "teacher")
    return chunked_statistics(
        objective, rollout.view_heads(views), rollout.ids[rollout.mask], chunk_rows=chunk_rows
    )


def test_statistics_of_two_halves_merge_to_one_call():
    rollout = random_rollout(4, 6, 70, seed=5, lengths=[6, 2, 5, 1])
    objective = build_objective("dopd")
    whole = _statistics(objective, rollout, chunk_rows=4)
    merged = merge_statistics(
        [
            _statistics(objective, rollout.rows(0, 3), 3),
            _statistics(objective, rollout.rows(3, 4), 5),
        ]
    )
    assert whole.keys() == merged.keys() == {"advantage_gap", "q_student", "q_teacher"}
    for key, value in whole.items():
        assert_close(merged[key], value, ulps=REORDERED, msg=key)


@pytest.mark.parametrize(
    "name", ["dopd", "tip", "eopd", "exopd", "forward_kl_sampled", "js_full", "pruned_opd"]
)
def test_fully_masked_batch_gives_zero_loss_and_zero_gradients(name):
    rollout = random_rollout(2, 4, 40, seed=6, lengths=[0, 0])
    student_hidden, student_head = _leaves(rollout)
    out = _chunked(build_objective(name), rollout, 3)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.per_token_loss.shape == (0,) and out.groups.shape == (0,)
    assert (student_hidden.grad == 0).all() and (student_head.grad == 0).all()
    assert all(value.shape == (0,) for value in out.statistics.values())
    assert all(math.isfinite(value) for value in out.metrics.values())


def test_bf16_hidden_states_give_a_float32_loss_close_to_the_reference():
    rollout = random_rollout(2, 8, 150, seed=7, dtype=torch.bfloat16, lengths=[8, 5])
    student_hidden, student_head = _leaves(rollout)
    objective = build_objective("dopd", top_k=16)
    reference = _reference(objective, rollout)
    expected_grads = torch.autograd.grad(reference.loss, (student_hidden, student_head))
    out = _chunked(objective, rollout, 4)
    grads = torch.autograd.grad(out.loss, (student_hidden, student_head))
    assert out.loss.dtype == torch.float32 and out.per_token_loss.dtype == torch.float32
    # The loss is accumulated in float32 on both paths from the same bf16 logits.
    assert_close(out.loss, reference.loss, ulps=REORDERED, dtype=torch.float32)
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
        # The head's gradient is accumulated over chunks in float32 and rounded to bf16 once, the
        # reference's in one bf16 matmul: at most one bf16 rounding apart (measured: equal).
        assert_close(grad, expected, ulps=2, dtype=torch.bfloat16)


def test_gradient_reaches_only_the_student():
    rollout = random_rollout(2, 5, 50, seed=8, lengths=[5, 3])
    _leaves(rollout)
    constants = [
        rollout.hidden[name].requires_grad_(True)
        for name in ("priv_student", "teacher", "reference")
    ]
    constants.append(rollout.heads["teacher"].requires_grad_(True))
    _chunked(build_objective("exopd", granularity="full"), rollout, 4).loss.backward()
    _chunked(build_objective("dopd"), rollout, 4).loss.backward()
    assert all(tensor.grad is None for tensor in constants)
    assert (
        rollout.hidden["student"].grad.abs().sum() > 0
        and rollout.heads["student"].grad.abs().sum() > 0
    )


def test_no_grad_mode_returns_the_value_without_a_graph():
    rollout = random_rollout(2, 5, 50, seed=9, lengths=[5, 3])
    _leaves(rollout)
    objective = build_objective("dopd")
    with torch.no_grad():
        out = _chunked(objective, rollout, 4)
        expected = _reference(objective, rollout).loss
    assert not out.loss.requires_grad
    assert_close(out.loss, expected, ulps=REORDERED)


def test_no_projection_is_larger_than_a_chunk(monkeypatch):
    rollout = random_rollout(3, 8, 97, seed=10, lengths=[8, 8, 8])
    _leaves(rollout)
    projected_rows = []
    original = ViewHead.logits

    def recording(self, rows):
        logits = original(self, rows)
        projected_rows.append(logits.shape[0])
        return logits

    monkeypatch.setattr(ViewHead, "logits", recording)
    _chunked(build_objective("dopd"), rollout, 5).loss.backward()
    # Statistics pass: 2 views x 5 chunks; loss pass: 3 views x 5 chunks.
    assert len(projected_rows) == 25 and max(projected_rows) == 5


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(
        ["dopd", "tip", "eopd", "exopd", "gkd", "js_full", "forward_kl_sampled", "pruned_opd"]
    ),
    reduction=st.sampled_from(REDUCTIONS),
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    vocab=st.integers(2, 40),
    top_k=st.integers(1, 45),
    support=st.sampled_from(("student", "teacher", "union")),
    tail=st.booleans(),
    chunk_rows=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_reference_over_shapes_masks_and_chunks(
    name, reduction, lengths, vocab, top_k, support, tail, chunk_rows, seed
):
    rollout = random_rollout(
        len(lengths), 6, vocab, seed=seed, lengths=lengths, width=8, teacher_extra=3
    )
    objective = build_objective(
        name, top_k=top_k, topk_support=support, topk_tail=tail, reduction=reduction
    )
    _assert_same(objective, rollout, chunk_rows)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("step_denominator", [None, 11])
def test_row_weights_reduce_like_reduce_loss(reduction, step_denominator, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(5, 7, generator=generator) < 0.6  # [B, T]
    mask[2] = False
    per_token = torch.rand(5, 7, generator=generator, dtype=torch.float64)  # [B, T]
    weights = row_weights(mask, reduction, step_denominator, dtype=torch.float64)
    assert weights.shape == (int(mask.sum()),) and weights.dtype == torch.float64
    expected = reduce_loss(per_token, mask, reduction, step_denominator)
    assert_close((weights * per_token[mask]).sum(), expected, ulps=REORDERED)


def test_errors_say_what_is_wrong():
    rollout = random_rollout(1, 4, 30, seed=11, lengths=[4])
    heads = rollout.view_heads()
    ids, weights = rollout.ids[rollout.mask], torch.ones(4)
    objective = build_objective("dopd")
    without_priv = {name: head for name, head in heads.items() if name != "priv_student"}
    with pytest.raises(
        ValueError, match=r"reads the priv_student view; pass heads\['priv_student'\]"
    ):
        chunked_objective_loss(objective, without_priv, ids, weights)
    teacher = heads["teacher"]
    short_teacher = {**heads, "teacher": ViewHead(teacher.hidden, teacher.weight[:-1])}
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        chunked_objective_loss(objective, short_teacher, ids, weights)
    narrow_teacher = {**heads, "teacher": ViewHead(heads["student"].hidden, teacher.weight)}
    with pytest.raises(ValueError, match=r"heads\['teacher'\].hidden must be \[N, d\]"):
        chunked_objective_loss(objective, narrow_teacher, ids, weights)
    with pytest.raises(ValueError, match="unknown views"):
        chunked_objective_loss(objective, {**heads, "critic": teacher}, ids, weights)
    with pytest.raises(ValueError, match="row_weights must be"):
        chunked_objective_loss(objective, heads, ids, weights[:2])
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        chunked_objective_loss(objective, heads, ids, weights, chunk_rows=0)


def test_outputs_have_documented_shapes():
    documented = " ".join(inspect.getdoc(ChunkedOutput).split())
    for text in ("loss: 0-d", "per_token_loss: ``[N]``", "groups: ``[N]`` long", "name -> ``[N]``"):
        assert text in documented, text
    assert "``[N]`` float weights" in " ".join(inspect.getdoc(row_weights).split())
    rollout = random_rollout(2, 5, 30, seed=12, lengths=[5, 2])
    _leaves(rollout)
    out = _chunked(build_objective("dopd"), rollout, 3)
    assert out.loss.shape == () and out.per_token_loss.shape == (7,) and out.groups.shape == (7,)
    assert out.groups.dtype == torch.long and all(
        value.shape == (7,) for value in out.statistics.values()
    )


def test_student_metrics_are_entropy_and_sampled_logp_of_the_untempered_student_logits():
    rollout = random_rollout(3, 6, 61, seed=13, lengths=[6, 0, 4])
    _leaves(rollout)
    objective = build_objective("dopd", top_k=8, temperature=0.7)
    out = _chunked(objective, rollout, 4, student_metrics=True)
    logp = rollout.logits("student")[rollout.mask].detach().log_softmax(-1)  # [N, V]
    expected = -(logp.exp() * logp).sum(-1)  # [N]
    assert_close(out.student_entropy, expected, ulps=REORDERED)
    ids = rollout.ids[rollout.mask]
    assert_close(
        out.student_log_probs, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), ulps=REORDERED
    )
    plain = _chunked(objective, rollout, 4)
    assert plain.student_entropy is None and plain.student_log_probs is None


@pytest.mark.parametrize("name", ["dopd", "eopd", "pruned_opd"])
def test_statistics_need_only_the_statistics_views(name):
    rollout = random_rollout(2, 6, 45, seed=14, lengths=[6, 3])
    objective = build_objective(name)
    out = chunked_statistics(
        objective,
        rollout.view_heads(objective.statistics_views),
        rollout.ids[rollout.mask],
        chunk_rows=4,
    )
    expected = _statistics(objective, rollout, chunk_rows=4)
    assert out.keys() == expected.keys()
    for key, value in out.items():
        assert_close(value, expected[key], ulps=REORDERED, msg=key)
