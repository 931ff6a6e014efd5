"""Tests of dopd.modeling.alignment: EOS masks, view layout, and per-token scores equal to
unpadded ones."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dopd.errors import DOPDError
from dopd.modeling.alignment import (
    build_view_inputs,
    check_aligned,
    completion_hidden_states,
    completion_logits,
    completion_mask_after_eos,
    output_head_problem,
)
from dopd.modeling.tiny import build_tiny_model
from dopd.objectives.views import ViewHead
from tests.tolerance import REORDERED, assert_close

VOCAB = 64
EOS = 2
PAD = 0


@functools.cache
def tiny_model() -> torch.nn.Module:
    # A wide initialisation makes the logits far from uniform, so a token scored at the wrong
    # position or with the wrong rotary position changes its log-prob by far more than rounding.
    # float64: with logits this large, float32 batched-vs-single kernels differ by ~1e-5 already.
    model = build_tiny_model(VOCAB, num_hidden_layers=2, seed=0, initializer_range=0.5)
    return model.to(torch.float64).eval()


def reference_mask(rows: list[list[int]], eos_ids: set[int]) -> list[list[bool]]:
    """Independent loop: valid until (and including) the first EOS."""
    result = []
    for row in rows:
        valid, ended = [], False
        for token in row:
            valid.append(not ended)
            ended = ended or token in eos_ids
        result.append(valid)
    return result


# ---------------------------------------------------------------------------------------------
# completion_mask_after_eos

token_rows = st.integers(1, 4).flatmap(
    lambda batch: st.integers(1, 8).flatmap(
        lambda length: st.lists(
            st.lists(st.integers(0, 5), min_size=length, max_size=length),
            min_size=batch,
            max_size=batch,
        )
    )
)


@settings(max_examples=100, deadline=None)
@given(rows=token_rows, eos_ids=st.sampled_from([[EOS], [EOS, 4]]))
def test_mask_after_eos_matches_loop_reference(rows, eos_ids):
    ids = torch.tensor(rows)  # [B, T], ids 0..5 so EOS appears often, several times, or never
    eos = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    expected = torch.tensor(reference_mask(rows, set(eos_ids)))
    assert torch.equal(completion_mask_after_eos(ids, eos), expected)


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    ended=st.lists(st.booleans(), min_size=4),
)
def test_mask_after_eos_when_pad_equals_eos(lengths, ended):
    # generate() pads finished rows with pad_token_id; here pad == eos, so "!= pad" would drop
    # every row's real EOS, and rows that never ended must stay valid to the end.
    width = 7
    rows, expected = [], []
    for length, finished in zip(lengths, ended):
        body = [3 + (position % 3) for position in range(length)]
        row = body + [EOS] * (width - length) if finished else [3] * width
        rows.append(row)
        expected.append(
            [position <= length for position in range(width)] if finished else [True] * width
        )
    mask = completion_mask_after_eos(torch.tensor(rows), EOS)
    assert mask.tolist() == expected


def test_mask_without_eos_id_is_all_valid():
    ids = torch.tensor([[EOS, EOS, 1]])
    assert completion_mask_after_eos(ids, None).tolist() == [[True, True, True]]


# ---------------------------------------------------------------------------------------------
# build_view_inputs and check_aligned


def test_view_layout_pinned():
    completion_ids = torch.tensor([[7, EOS, 9], [8, 8, 8]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    inputs = build_view_inputs([[5], [5, 6, 4]], completion_ids, mask, PAD)
    assert inputs.input_ids.tolist() == [[PAD, PAD, 5, 7, EOS, PAD], [5, 6, 4, 8, 8, 8]]
    assert inputs.attention_mask.tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert inputs.position_ids.tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]
    assert inputs.completion_length == 3
    assert torch.equal(inputs.completion_mask, mask)
    for tensor in (inputs.input_ids, inputs.attention_mask, inputs.position_ids):
        assert tensor.dtype == torch.long and tensor.shape == (2, 6)


@pytest.mark.parametrize(
    "prompts, mask, message",
    [
        ([[5]], [[True, True], [True, True]], "1 prompts for 2 completions"),
        ([[5], []], [[True, True], [True, True]], r"prompt rows \[1\] are empty"),
        ([[5], [6]], [[True, False], [False, True]], "must be a prefix"),
    ],
)
def test_view_inputs_reject_misuse(prompts, mask, message):
    with pytest.raises(DOPDError, match=message):
        build_view_inputs(prompts, torch.tensor([[3, 4], [3, 4]]), torch.tensor(mask), PAD)


def test_check_aligned_compares_valid_counts_per_row():
    first = torch.tensor([[True, True, False], [True, False, False]])
    check_aligned(first, first.clone(), torch.tensor([[True, False, True], [False, False, True]]))
    with pytest.raises(DOPDError, match=r"view 1 has valid-token counts \[2, 2\]"):
        check_aligned(first, torch.tensor([[True, True, False], [True, True, False]]))


# ---------------------------------------------------------------------------------------------
# completion_logits: the alignment property


@st.composite
def rollouts(draw):
    """Prompts of two views with unrelated lengths, one shared completion batch, EOS anywhere."""
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 6))
    prompt = st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=9)
    plain = draw(st.lists(prompt, min_size=batch, max_size=batch))
    privileged = draw(st.lists(prompt, min_size=batch, max_size=batch))
    pad = draw(st.sampled_from([PAD, EOS]))
    rows = []
    for _ in range(batch):
        row = draw(st.lists(st.integers(3, VOCAB - 1), min_size=length, max_size=length))
        eos_at = draw(st.one_of(st.none(), st.integers(0, length - 1)))
        if eos_at is not None:
            # After EOS the sampler either padded (generate) or kept sampling (junk, maybe EOS).
            tail = draw(st.sampled_from(["pad", "junk"]))
            row[eos_at] = EOS
            for position in range(eos_at + 1, length):
                row[position] = pad if tail == "pad" else draw(st.integers(0, VOCAB - 1))
        rows.append(row)
    return plain, privileged, torch.tensor(rows), pad


def unpadded_token_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Reference: one row alone, no padding, no mask, default positions. ``[len(completion)]``."""
    sequence = torch.tensor([prompt + completion])  # [1, L]
    logp = torch.log_softmax(model(input_ids=sequence).logits[0], dim=-1)  # [L, V]
    scoring = logp[len(prompt) - 1 : len(prompt) - 1 + len(completion)]  # [len(completion), V]
    return scoring.gather(-1, torch.tensor(completion)[:, None])[:, 0]


@settings(max_examples=25, deadline=None)
@given(rollouts())
@torch.no_grad()
def test_every_view_scores_each_valid_token_like_an_unpadded_forward(rollout):
    plain_prompts, privileged_prompts, completion_ids, pad = rollout
    model = tiny_model()
    mask = completion_mask_after_eos(completion_ids, EOS)  # [B, T]
    views = []
    for prompts in (plain_prompts, privileged_prompts):
        inputs = build_view_inputs(prompts, completion_ids, mask, pad)
        logits = completion_logits(model, inputs)  # [B, T, V]
        assert logits.shape == (*completion_ids.shape, VOCAB)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids[..., None])[..., 0]
        for row, prompt in enumerate(prompts):
            valid = int(mask[row].sum())
            expected = unpadded_token_logprobs(model, prompt, completion_ids[row, :valid].tolist())
            # A padded batch and one unpadded sequence: the same float64 sums, other shapes.
            assert_close(logp[row, :valid], expected, ulps=REORDERED)
        views.append(inputs.completion_mask)
    check_aligned(mask, *views)


class PositionalOnly(torch.nn.Module):
    """A model whose forward does not take ``logits_to_keep``, like some transformers families."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )


@torch.no_grad()
def test_completion_logits_without_logits_to_keep_support():
    model = tiny_model()
    completion_ids = torch.tensor([[5, EOS, 9], [6, 7, 8]])
    inputs = build_view_inputs(
        [[3, 4], [9]], completion_ids, completion_mask_after_eos(completion_ids, EOS), PAD
    )
    # Without logits_to_keep the head projects every position, then the slice applies: the same
    # float64 dot products in matmuls of another shape.
    assert_close(
        completion_logits(PositionalOnly(model), inputs),
        completion_logits(model, inputs),
        ulps=REORDERED,
    )


# ---------------------------------------------------------------------------------------------
# completion_hidden_states: what the output head sees, without [B, T, V] logits


def _inputs():
    completion_ids = torch.tensor([[5, 6, EOS, 9], [6, 7, 8, 10]])
    mask = completion_mask_after_eos(completion_ids, EOS)
    return build_view_inputs([[3, 4], [9]], completion_ids, mask, PAD), mask


class ExposedHead(PositionalOnly):
    """``PositionalOnly`` that exposes the wrapped model's output head."""

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


@pytest.mark.parametrize("wrap", [False, True])
@torch.no_grad()
def test_projected_hidden_states_are_the_completion_logits(wrap):
    model = tiny_model()
    inputs, _ = _inputs()
    # A model without logits_to_keep sends every position to its head; the slice still applies.
    head = completion_hidden_states(ExposedHead(model) if wrap else model, inputs)
    hidden, weight = head.projection()
    # One float64 projection as a matmul, the other inside the model's head.
    assert_close(hidden @ weight.T, completion_logits(model, inputs), ulps=REORDERED)
    assert head.weight is model.lm_head.weight and head.dtype == torch.float64


def test_view_heads_have_documented_shapes():
    documented = " ".join(inspect.getdoc(ViewHead).split())
    assert "hidden: ``[B, T, H]`` (``[N, H]`` after ``select``)" in documented
    assert "weight: ``[V, H]``" in documented
    inputs, mask = _inputs()
    with torch.no_grad():
        head = completion_hidden_states(tiny_model(), inputs)
    hidden_size = tiny_model().config.hidden_size
    assert head.hidden.shape == (2, 4, hidden_size) and head.weight.shape == (VOCAB, hidden_size)
    assert head.select(mask).hidden.shape == (int(mask.sum()), hidden_size)


def test_hidden_states_carry_the_gradient():
    model = build_tiny_model(VOCAB, num_hidden_layers=1, seed=1)
    inputs, mask = _inputs()
    hidden, weight = completion_hidden_states(model, inputs).select(mask).projection()
    (hidden @ weight.T).logsumexp(-1).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    completion_logits(model, inputs)[mask].logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        # float32: the same gradient through a projection of selected rows and of all positions.
        assert_close(expected[name], p.grad, ulps=REORDERED, msg=name)


class Scaled(ExposedHead):
    """A head transform no config field announces: ``output_head_problem`` cannot see it."""

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        outputs = super().forward(input_ids, attention_mask, position_ids, use_cache)
        outputs.logits = outputs.logits * 0.5
        return outputs


@torch.no_grad()
def test_an_unannounced_logit_transform_is_caught():
    model = Scaled(tiny_model())
    assert output_head_problem(model) is None
    with pytest.raises(DOPDError, match="transforms its logits after the output head"):
        completion_hidden_states(model, _inputs()[0])


def test_output_head_problems_name_the_reason():
    assert output_head_problem(tiny_model()) is None
    assert "get_output_embeddings() is NoneType" in output_head_problem(
        PositionalOnly(tiny_model())
    )
    capped = build_tiny_model(VOCAB, seed=0, final_logit_softcapping=30.0)
    assert "config.final_logit_softcapping=30.0" in output_head_problem(capped)
    biased = build_tiny_model(VOCAB, seed=0, tie_word_embeddings=False)
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
    assert "has a bias" in output_head_problem(biased)
