"""The vLLM engine as dopd drives it, against the HF backend on the same weights: greedy decoding
agrees token for token (EOS, mask and padding through the same ``finish_rollouts``), seeded rows
do not depend on the batch they are sent in, sampling draws the model's distribution, the recorded
log-probs are the model's, padded vocabulary ids are never sampled, and a weight reload reaches
the engine."""

import copy

import numpy as np
import pytest
import torch

from dopd.training.rollout import finish_rollouts, generate_rollouts, rollout_seeds
from dopd.training.vllm_engine import (
    SamplingRequest,
    engine_generate,
    engine_load_weights,
    named_weights,
)
from tests.test_rollout import assert_frequencies_match

TEXTS = ["12+7=", "3*4=", "(1+2)*3=", "x", "9-8-7="]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def prompts(run_tokenizer) -> list[list[int]]:
    return [run_tokenizer(text)["input_ids"] for text in TEXTS]


def vllm_rollouts(engine, tokenizer, prompts, seeds=None, generations=1, **sampling):
    """``Rollouts`` from the engine, through the same ``finish_rollouts`` the backend uses."""
    request = SamplingRequest(
        prompts=[list(ids) for ids in prompts for _ in range(generations)],
        seeds=None if seeds is None else seeds.tolist(),
        max_tokens=sampling.pop("max_tokens", MAX_TOKENS),
        temperature=sampling.pop("temperature", 1.0),
        top_p=sampling.pop("top_p", 1.0),
        top_k=sampling.pop("top_k", 0),
        eos_token_id=sampling.pop("eos_token_id", tokenizer.eos_token_id),
        vocab_size=sampling.pop("vocab_size", None),
    )
    assert not sampling, sampling
    completions, log_probs = engine_generate(engine, request)
    return finish_rollouts(
        completions,
        len(prompts),
        generations,
        eos_token_id=request.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        log_probs=log_probs,
    )


def hf_greedy(model, tokenizer, prompts, eos_token_id):
    return generate_rollouts(
        model,
        prompts,
        eos_token_id=eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_completion_length=MAX_TOKENS,
    )


def rows(rollouts) -> list[list[int]]:
    return [r[m].tolist() for r, m in zip(rollouts.completion_ids, rollouts.completion_mask)]


def test_greedy_vllm_equals_greedy_hf_with_the_same_eos_and_mask(
    engine, student, run_tokenizer, prompts
):
    # An EOS id that greedy decoding actually emits (the token row 0 takes at position 3), so
    # that some rows stop early and the EOS/mask/padding rules are exercised on both backends.
    first = hf_greedy(student, run_tokenizer, prompts, run_tokenizer.eos_token_id)
    eos = int(first.completion_ids[0, 3])
    hf = hf_greedy(student, run_tokenizer, prompts, eos)
    ours = vllm_rollouts(engine, run_tokenizer, prompts, temperature=0.0, eos_token_id=eos)
    assert (~hf.truncated).any(), "the positive control: some row must end at the EOS"
    assert rows(ours) == rows(hf)
    assert torch.equal(ours.completion_mask, hf.completion_mask)
    assert torch.equal(ours.completion_ids, hf.completion_ids)
    assert torch.equal(ours.truncated, hf.truncated)
    for row, mask in zip(ours.completion_ids, ours.completion_mask):
        tokens = row[mask].tolist()
        assert eos not in tokens[:-1]  # nothing after the first EOS is a completion token


def test_seeded_rows_do_not_depend_on_the_batch_they_are_sent_in(engine, run_tokenizer, prompts):
    generations = 3
    seeds = rollout_seeds(7, 2, torch.arange(len(prompts)), generations)
    whole = rows(vllm_rollouts(engine, run_tokenizer, prompts, seeds, generations))
    assert whole == rows(vllm_rollouts(engine, run_tokenizer, prompts, seeds, generations))
    assert len({tuple(r) for r in whole}) > len(prompts)  # the draws differ between rows
    # Reversed, and split in two requests (as across ranks or a resumed run): the same rows.
    order = list(reversed(range(len(prompts))))
    back = rollout_seeds(7, 2, torch.tensor(order), generations)
    reversed_rows = rows(vllm_rollouts(engine, run_tokenizer, [prompts[i] for i in order], back, 3))
    by_prompt = [reversed_rows[3 * order.index(p) : 3 * order.index(p) + 3] for p in range(5)]
    assert sum(by_prompt, []) == whole
    split = rows(vllm_rollouts(engine, run_tokenizer, prompts[:2], seeds[:6], generations))
    split += rows(vllm_rollouts(engine, run_tokenizer, prompts[2:], seeds[6:], generations))
    assert split == whole


@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 5}])
def test_vllm_samples_the_models_first_token_distribution(
    engine, student, run_tokenizer, prompts, sampling
):
    draws = 4000
    seeds = rollout_seeds(3, 0, torch.zeros(1, dtype=torch.long), draws)
    result = vllm_rollouts(
        engine, run_tokenizer, prompts[:1], seeds, draws, max_tokens=1, **sampling
    )
    with torch.no_grad():
        logits = student(input_ids=torch.tensor(prompts[:1])).logits[0, -1].double()
    logits = logits / sampling["temperature"]
    if "top_k" in sampling:
        cut = logits.topk(sampling["top_k"]).values[-1]
        logits = logits.masked_fill(logits < cut, float("-inf"))
    expected = logits.softmax(-1).numpy()
    assert_frequencies_match(result.completion_ids[:, 0].numpy(), expected)


def test_recorded_log_probs_are_the_models_unwarped_log_probs(
    engine, student, run_tokenizer, prompts
):
    seeds = rollout_seeds(5, 1, torch.arange(len(prompts)), 2)
    result = vllm_rollouts(engine, run_tokenizer, prompts, seeds, 2, temperature=0.8, top_k=8)
    for row, prompt in enumerate(p for p in prompts for _ in range(2)):
        tokens = result.completion_ids[row][result.completion_mask[row]]
        with torch.no_grad():
            logits = student(input_ids=torch.tensor([prompt + tokens.tolist()])).logits
        expected = logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        expected = expected.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        recorded = result.sampled_log_probs[row][result.completion_mask[row]]
        torch.testing.assert_close(recorded, expected, rtol=0, atol=1e-4)


def test_ids_past_the_common_vocabulary_are_never_sampled(engine, run_tokenizer, prompts):
    vocab = len(run_tokenizer)
    seeds = rollout_seeds(11, 0, torch.arange(len(prompts)), 8)
    hot = {"temperature": 2.0, "max_tokens": 16}
    free = vllm_rollouts(engine, run_tokenizer, prompts, seeds, 8, **hot)
    assert (free.completion_ids[free.completion_mask] >= vocab // 2).any()  # positive control
    capped = vllm_rollouts(engine, run_tokenizer, prompts, seeds, 8, vocab_size=vocab // 2, **hot)
    assert (capped.completion_ids[capped.completion_mask] < vocab // 2).all()
    assert np.isfinite(capped.sampled_log_probs.numpy()).all()


def test_a_weight_reload_reaches_the_engine(engine, student, run_tokenizer, prompts):
    eos = run_tokenizer.eos_token_id
    before = rows(vllm_rollouts(engine, run_tokenizer, prompts, temperature=0.0))
    changed = copy.deepcopy(student)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    try:
        seconds = engine_load_weights(engine, named_weights(changed))
        after = rows(vllm_rollouts(engine, run_tokenizer, prompts, temperature=0.0))
        assert seconds > 0
        assert after != before
        assert after == rows(hf_greedy(changed, run_tokenizer, prompts, eos))
    finally:  # the session's engine goes back to the student's weights
        engine_load_weights(engine, named_weights(student))
    assert rows(vllm_rollouts(engine, run_tokenizer, prompts, temperature=0.0)) == before


def test_heads_too_narrow_for_cpu_attention_are_refused_by_name(run_config, run_tokenizer):
    from dopd.errors import ConfigError
    from dopd.modeling.loading import load_model
    from dopd.training.vllm_engine import engine_settings

    narrow = dict(run_config.student.tiny, head_dim=16)
    model = load_model(type(run_config.student)(tiny=narrow), run_tokenizer, seed=0, key="student")
    with pytest.raises(ConfigError, match="heads are 16 wide.*head_dim >= 32"):
        engine_settings(run_config, "unused", model)
