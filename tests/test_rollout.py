"""Tests of dopd.training.rollout (hash uniforms, exact inverse-CDF sampling, batch-invariant
rollouts, token classes) and of
dopd.training.rollout.PromptSampler (the per-step prompt schedule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dopd.errors import ConfigError, DOPDError
from dopd.training import rollout as rollout_module
from dopd.training.rollout import (
    HashInverseCDFSampler,
    PromptSampler,
    Rollouts,
    completion_token_classes,
    generate_rollouts,
    hash_uniform,
    rollout_logits_processors,
    rollout_seeds,
)
from tests.tiny_models import arithmetic_tokenizer
from tests.tolerance import tolerance

MASK64 = (1 << 64) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
PROMPTS = ["1+2=", "12*34+5=", "7=", "99*9=", "3*3*3+1="]
MAX_LENGTH = 12


def chi_square_bound(df: int, z: float = 5.0) -> float:
    """Upper ``z``-sigma quantile of chi-square(df) (Wilson-Hilferty; z=5 is p ~ 3e-7)."""
    scale = 2.0 / (9.0 * df)
    return df * (1.0 - scale + z * math.sqrt(scale)) ** 3


def assert_frequencies_match(samples: np.ndarray, probabilities: np.ndarray) -> None:
    """``samples`` (category ids) are draws from ``probabilities``: zero-mass categories never
    appear and Pearson's chi-square stays below a bound a correct sampler passes almost surely."""
    counts = np.bincount(samples, minlength=len(probabilities)).astype(np.float64)
    support = probabilities > 0
    assert counts[~support].sum() == 0, f"sampled outside the support: {counts}"
    expected = probabilities[support] * len(samples)
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    assert statistic < chi_square_bound(int(support.sum()) - 1), (statistic, counts, expected)


# -- hash_uniform ------------------------------------------------------------------------------


def reference_mix(key: int) -> float:
    """The documented splitmix-style mixer in unbounded Python ints (mod 2**64), as a fraction
    of 2**64: what the uniform approximates to within its 52-53 bits of resolution."""
    x = (key * 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    x ^= x >> 31
    return x / 2.0**64


def test_hash_uniform_shape_dtype_and_open_interval():
    keys = torch.arange(200_000, dtype=torch.long).reshape(400, 500)
    values = hash_uniform(keys)
    assert values.shape == keys.shape and values.dtype == torch.float64
    assert values.min() > 0.0 and values.max() < 1.0


def test_hash_uniform_is_strictly_below_one_for_the_largest_hash():
    # The key whose mixed value is 2**64 - 1 (found by inverting the bijective mixer) yields the
    # largest 53-bit cell; (2**53 - 1 + 0.5) / 2**53 is not representable and must not round to 1.
    def unxorshift(y: int, bits: int) -> int:
        x = y
        for _ in range(64 // bits + 1):
            x = y ^ (x >> bits)
        return x & MASK64

    x = MASK64
    x = unxorshift(x, 31) * pow(0x94D049BB133111EB, -1, 1 << 64) & MASK64
    x = unxorshift(x, 27) * pow(0xBF58476D1CE4E5B9, -1, 1 << 64) & MASK64
    x = unxorshift(x, 30) * pow(0x9E3779B97F4A7C15, -1, 1 << 64) & MASK64
    key = x - (1 << 64) if x > INT64_MAX else x
    value = hash_uniform(torch.tensor([key])).item()
    assert 0.0 < value < 1.0
    # u < 1 keeps u * total below the total mass, so inverse-CDF sampling stays inside the
    # support; log(u) finite keeps u > 0 too.
    assert math.isfinite(math.log(value)) and value < 1.0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=1, max_size=50))
def test_hash_uniform_matches_python_integer_reference(keys):
    values = hash_uniform(torch.tensor(keys, dtype=torch.long))
    expected = torch.tensor([reference_mix(k) for k in keys], dtype=torch.float64)
    # The int64 wrapping products and logical shifts agree with exact integer arithmetic in
    # every bit the uniform keeps; a slip in any of them moves the value by far more. The uniform
    # is a cell centre of a 2**-52 grid on [0, 1), so its error against the exact fraction is not
    # rounding but absolute: at most half a cell, on the scale of the interval (1), not of each
    # value. One float64 ulp of 1 is one cell.
    torch.testing.assert_close(values, expected, rtol=0.0, atol=tolerance(1.0, 1.0, ulps=1))


def test_hash_uniform_is_deterministic_and_leaves_global_rng_alone(seed):
    keys = torch.randint(
        INT64_MIN, INT64_MAX, (1000,), generator=torch.Generator().manual_seed(seed)
    )
    state = torch.get_rng_state()
    first, second = hash_uniform(keys), hash_uniform(keys.clone())
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)
    # Elementwise: a key's value does not depend on its neighbours.
    assert torch.equal(hash_uniform(keys.flip(0)), first.flip(0))


def test_hash_uniform_distinct_keys_give_distinct_values():
    keys = torch.cat(
        [torch.arange(100_000), torch.arange(-50_000, 0), (torch.arange(50_000) + 1) << 40]
    )
    values = hash_uniform(keys)
    assert torch.unique(keys).numel() == keys.numel()
    assert torch.unique(values).numel() == values.numel()


@pytest.mark.parametrize("structured", [True, False])
def test_hash_uniform_is_uniform(structured):
    n = 200_000
    if structured:  # consecutive keys: the case a weak mixer fails
        keys = torch.arange(n, dtype=torch.long)
    else:
        keys = torch.randint(INT64_MIN, INT64_MAX, (n,), generator=torch.Generator().manual_seed(0))
    values = np.sort(hash_uniform(keys).numpy())
    # Kolmogorov-Smirnov: the p = 1e-6 critical value is sqrt(ln(2 / 1e-6) / (2 n)) ~ 0.0060.
    grid = np.arange(1, n + 1) / n
    statistic = max(np.max(grid - values), np.max(values - (grid - 1.0 / n)))
    assert statistic < math.sqrt(math.log(2 / 1e-6) / (2 * n))
    # Binned chi-square over 100 equal bins.
    bins = 100
    assert_frequencies_match((values * bins).astype(np.int64), np.full(bins, 1.0 / bins))


# -- HashInverseCDFSampler: exact sampling ----------------------------------------------------

SCORES = torch.tensor([1.2, -0.3, 0.5, 2.0, -1.5, 0.9])  # [V] toy logits, no ties
ROWS = 100_000
PROMPT_LENGTH = 3


def sample_argmax(position: int, row_seeds: torch.Tensor, **sampling) -> np.ndarray:
    """``[B]`` argmax of the toy scores at ``position`` generated tokens after the processors
    ``generate_rollouts`` uses for ``sampling`` (``rollout_logits_processors``, not a copy)."""
    sampler_chain = rollout_logits_processors(PROMPT_LENGTH, row_seeds=row_seeds, **sampling)
    input_ids = torch.zeros((len(row_seeds), PROMPT_LENGTH + position), dtype=torch.long)  # [B, L]
    scores = SCORES.expand(len(row_seeds), -1).clone()  # [B, V]
    return sampler_chain(input_ids, scores).argmax(-1).numpy()


def reference_distribution(
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, vocab_size: int | None = None
) -> np.ndarray:
    """softmax(scores / temperature) over the first ``vocab_size`` ids (all by default),
    restricted to the top-k then to the nucleus, renormalised."""
    logits = SCORES.double().numpy() / temperature
    if vocab_size is not None:
        logits[vocab_size:] = -np.inf
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities)
    if top_k > 0:
        probabilities[order[top_k:]] = 0.0
        probabilities /= probabilities.sum()
    if top_p < 1.0:
        mass_before = np.cumsum(probabilities[order]) - probabilities[order]
        probabilities[order[mass_before >= top_p]] = 0.0
        probabilities /= probabilities.sum()
    return probabilities


def test_hash_sampler_argmax_samples_the_softmax():
    row_seeds = torch.arange(ROWS, dtype=torch.long)
    samples = sample_argmax(0, row_seeds)
    assert_frequencies_match(samples, reference_distribution())


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(0.7, 0, 1.0), (1.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (0.8, 4, 0.7)],
)
def test_hash_sampler_after_warpers_samples_the_warped_distribution(temperature, top_k, top_p):
    row_seeds = rollout_seeds(11, 3, torch.arange(ROWS // 4), 4)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    samples = sample_argmax(5, row_seeds, **sampling)
    assert_frequencies_match(samples, reference_distribution(**sampling))


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (2, 1.0), (0, 0.8)])
def test_hash_sampler_after_the_vocabulary_mask_samples_the_common_vocabulary(top_k, top_p):
    # The mask runs first: with ids >= 3 masked, top-2 and the 0.8 nucleus both keep ids {0, 2};
    # masking after them would keep id 0 alone (the overall top-2 is {3, 0}, the overall
    # nucleus {3, 0, 5}).
    row_seeds = rollout_seeds(5, 2, torch.arange(ROWS // 4), 4)
    sampling = {"temperature": 0.8, "top_k": top_k, "top_p": top_p, "vocab_size": 3}
    samples = sample_argmax(2, row_seeds, **sampling)
    assert_frequencies_match(samples, reference_distribution(**sampling))


def test_rollout_processors_without_seeds_are_greedy_and_mask_only():
    input_ids = torch.zeros((8, PROMPT_LENGTH), dtype=torch.long)  # [B, L]
    scores = SCORES.expand(8, -1).clone()  # [B, V]
    greedy = rollout_logits_processors(PROMPT_LENGTH, temperature=0.5, top_k=2, top_p=0.5)
    assert torch.equal(greedy(input_ids, scores.clone()), scores)  # no seeds: the scores as given
    masked = rollout_logits_processors(PROMPT_LENGTH, vocab_size=3)(input_ids, scores.clone())
    assert torch.equal(masked[:, :3], scores[:, :3]) and torch.isneginf(masked[:, 3:]).all()
    # A mask at the head's own size masks nothing: every id is drawn somewhere among many rows.
    many = torch.arange(4000, dtype=torch.long)
    sampled = rollout_logits_processors(PROMPT_LENGTH, row_seeds=many, vocab_size=6)
    chain_input = torch.zeros((len(many), PROMPT_LENGTH), dtype=torch.long)
    drawn = sampled(chain_input, SCORES.expand(len(many), -1).clone()).argmax(-1)
    assert set(drawn.tolist()) == set(range(6))


def test_hash_sampler_draws_at_different_positions_are_independent():
    row_seeds = torch.arange(ROWS, dtype=torch.long) * 7 + 3
    first = sample_argmax(0, row_seeds)
    second = sample_argmax(1, row_seeds)
    probabilities = reference_distribution()
    joint = np.outer(probabilities, probabilities).reshape(-1)  # [V * V] product distribution
    assert_frequencies_match(first * len(probabilities) + second, joint)


def test_hash_sampler_position_ignores_prompt_padding():
    row_seeds = torch.arange(8, dtype=torch.long)
    scores = SCORES.expand(8, -1)  # [B, V]
    short = HashInverseCDFSampler(row_seeds, 4)(torch.zeros((8, 4 + 2), dtype=torch.long), scores)
    long = HashInverseCDFSampler(row_seeds, 9)(torch.zeros((8, 9 + 2), dtype=torch.long), scores)
    assert torch.equal(short, long)


def test_hash_sampler_two_level_draw_samples_across_blocks():
    # 389 ids: three whole blocks of 128 and a padded fourth; the mass sits in every block,
    # at both edges of blocks, with zero-mass ids between.
    vocab = 389
    support = torch.tensor([0, 5, 127, 128, 200, 255, 256, 300, 383, 384, 388])
    probabilities = torch.zeros(vocab, dtype=torch.float64)
    probabilities[support] = torch.linspace(1.0, 3.0, len(support), dtype=torch.float64)
    probabilities /= probabilities.sum()
    uniforms = hash_uniform(rollout_seeds(3, 1, torch.arange(ROWS // 2), 2))  # [ROWS]
    probs = probabilities.float().expand(ROWS, -1).contiguous()
    samples = HashInverseCDFSampler.draw(probs, uniforms).squeeze(-1).numpy()
    assert_frequencies_match(samples, probabilities.numpy())


def test_hash_sampler_never_takes_a_zero_mass_id_when_u_rounds_up(monkeypatch):
    # The largest uniform times the total can round to the total itself; the sampler must then
    # take the last id of positive mass, not a masked id after it.
    largest = 1.0 - 2.0**-53
    monkeypatch.setattr(
        rollout_module, "hash_uniform", lambda keys: torch.full(keys.shape, largest)
    )
    scores = torch.tensor([[0.3, 40.0, -2.0, float("-inf"), float("-inf")]]).expand(4, -1)
    sampler = HashInverseCDFSampler(torch.arange(4), PROMPT_LENGTH)
    out = sampler(torch.zeros((4, PROMPT_LENGTH), dtype=torch.long), scores.clone())
    assert out.argmax(-1).tolist() == [2, 2, 2, 2]
    assert torch.isneginf(out[:, [0, 1, 3, 4]]).all() and (out[:, 2] == 0).all()


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.6, 3)])
def test_hash_sampler_records_the_unwarped_log_prob_of_each_draw(temperature, top_k):
    row_seeds = torch.arange(64, dtype=torch.long)
    chain = rollout_logits_processors(
        PROMPT_LENGTH,
        row_seeds=row_seeds,
        temperature=temperature,
        top_k=top_k,
        vocab_size=5,
        record_log_probs=True,
    )
    scores = SCORES.expand(64, -1).clone()  # [B, V]
    drawn = chain(torch.zeros((64, PROMPT_LENGTH), dtype=torch.long), scores.clone()).argmax(-1)
    (log_probs,) = chain[-1].log_probs
    # The model's own distribution over the common vocabulary (ids < 5), not the warped one.
    expected = SCORES[:5].double().log_softmax(-1)[drawn]
    torch.testing.assert_close(log_probs.double(), expected, rtol=0, atol=1e-6)


# -- generate_rollouts on a tiny model ----------------------------------------------------------


# ``tokenizer`` and ``tiny_model`` are conftest.py's (tests.tiny_models).


@pytest.fixture(scope="module")
def model(tiny_model):
    # The wide initialisation of tiny_model makes greedy margins large (>= 1e-2), so greedy
    # decoding with and without the KV cache or padding cannot flip on float rounding.
    return tiny_model(seed=0).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    ids = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    assert len({len(row) for row in ids}) > 1, "the prompts must need padding"
    return ids


def rollout(
    model,
    tokenizer,
    prompts,
    prompt_index,
    *,
    pad_token_id=None,
    seed=0,
    step=0,
    generations=3,
    **sampling,
):
    return generate_rollouts(
        model,
        prompts,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if pad_token_id is None else pad_token_id,
        max_completion_length=MAX_LENGTH,
        num_generations=generations,
        row_seeds=rollout_seeds(seed, step, torch.as_tensor(prompt_index), generations),
        **sampling,
    )


def valid_tokens(rollouts) -> list[list[int]]:
    """Each row's completion tokens under its mask (independent of the batch's padded width)."""
    return [
        ids[mask].tolist() for ids, mask in zip(rollouts.completion_ids, rollouts.completion_mask)
    ]


def manual_greedy(model, prompt: list[int], eos_token_id: int) -> list[int]:
    """Greedy completion by full forward passes over the unpadded sequence, no cache."""
    ids = torch.tensor([prompt])  # [1, L]
    completion: list[int] = []
    with torch.no_grad():
        for _ in range(MAX_LENGTH):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            completion.append(token)
            if token == eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return completion


def test_rollouts_shapes_and_prompt_major_order(model, tokenizer, prompt_ids):
    result = rollout(model, tokenizer, prompt_ids, range(len(prompt_ids)))
    rows = len(prompt_ids) * 3
    assert result.completion_ids.shape[0] == rows and result.completion_ids.shape[1] <= MAX_LENGTH
    assert result.completion_ids.dtype == torch.long
    assert result.completion_mask.shape == result.completion_ids.shape
    assert result.completion_mask.dtype == torch.bool
    assert result.truncated.shape == (rows,) and result.truncated.dtype == torch.bool
    assert result.prompt_index.tolist() == [p for p in range(len(prompt_ids)) for _ in range(3)]


def test_rollouts_are_batch_composition_invariant_and_deterministic(model, tokenizer, prompt_ids):
    batch = rollout(model, tokenizer, prompt_ids, range(len(prompt_ids)), step=4)
    again = rollout(model, tokenizer, prompt_ids, range(len(prompt_ids)), step=4)
    assert torch.equal(batch.completion_ids, again.completion_ids)
    assert torch.equal(batch.completion_mask, again.completion_mask)
    batch_tokens = valid_tokens(batch)
    for index, prompt in enumerate(prompt_ids):
        alone = rollout(model, tokenizer, [prompt], [index], step=4)
        assert valid_tokens(alone) == batch_tokens[3 * index : 3 * index + 3]
        assert alone.truncated.tolist() == batch.truncated[3 * index : 3 * index + 3].tolist()
    # Split into two chunks (as across ranks or micro-batches): the same rollouts again.
    split = valid_tokens(rollout(model, tokenizer, prompt_ids[:2], [0, 1], step=4))
    split += valid_tokens(rollout(model, tokenizer, prompt_ids[2:], [2, 3, 4], step=4))
    assert split == batch_tokens


@pytest.mark.parametrize("generation_batch_size", [1, 4, 7])
def test_generation_batch_size_does_not_change_the_rollouts(
    model, tokenizer, prompt_ids, generation_batch_size
):
    sampling = {"temperature": 0.9, "record_log_probs": True}
    whole = rollout(model, tokenizer, prompt_ids, range(len(prompt_ids)), step=2, **sampling)
    parts = rollout(
        model,
        tokenizer,
        prompt_ids,
        range(len(prompt_ids)),
        step=2,
        generation_batch_size=generation_batch_size,
        **sampling,
    )
    assert valid_tokens(parts) == valid_tokens(whole)
    assert torch.equal(parts.truncated, whole.truncated)
    assert torch.equal(parts.prompt_index, whole.prompt_index)
    check_mask_and_padding(parts, tokenizer.eos_token_id, tokenizer.pad_token_id)
    mask = whole.completion_mask
    # Same rows, other paddings: the recorded log-probs agree to float32 rounding.
    torch.testing.assert_close(
        parts.sampled_log_probs[:, : mask.shape[1]][mask], whole.sampled_log_probs[mask]
    )
    assert (parts.sampled_log_probs[~parts.completion_mask] == 0).all()


def test_recorded_log_probs_equal_a_full_forward(model, tokenizer, prompt_ids):
    # What the trainer computes later (one forward over [prompt | completion]) is what the
    # sampler recorded during cached generation: the HF backend has no mismatch but rounding.
    result = rollout(model, tokenizer, prompt_ids, range(len(prompt_ids)), record_log_probs=True)
    for row, prompt in enumerate(p for p in prompt_ids for _ in range(3)):
        tokens = result.completion_ids[row][result.completion_mask[row]]
        ids = torch.tensor([prompt + tokens.tolist()])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # [t, V]
        expected = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        recorded = result.sampled_log_probs[row][result.completion_mask[row]]
        torch.testing.assert_close(recorded, expected, rtol=0, atol=1e-4)


def test_rollouts_depend_on_seed_step_and_generation(model, tokenizer, prompt_ids):
    base = valid_tokens(rollout(model, tokenizer, prompt_ids, range(len(prompt_ids))))
    assert (
        valid_tokens(rollout(model, tokenizer, prompt_ids, range(len(prompt_ids)), seed=1)) != base
    )
    assert (
        valid_tokens(rollout(model, tokenizer, prompt_ids, range(len(prompt_ids)), step=1)) != base
    )
    assert any(
        len({tuple(row) for row in base[3 * p : 3 * p + 3]}) > 1 for p in range(len(prompt_ids))
    )


def test_greedy_rollouts_equal_a_manual_argmax_loop(model, tokenizer, prompt_ids):
    result = generate_rollouts(
        model,
        prompt_ids,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_completion_length=MAX_LENGTH,
    )
    expected = [manual_greedy(model, prompt, tokenizer.eos_token_id) for prompt in prompt_ids]
    assert valid_tokens(result) == expected
    assert result.truncated.tolist() == [tokenizer.eos_token_id not in row for row in expected]


@pytest.mark.parametrize(
    "sampling", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "temperature": 3.0}]
)
def test_sampling_from_a_single_token_support_is_greedy(model, tokenizer, prompt_ids, sampling):
    greedy = generate_rollouts(
        model,
        prompt_ids,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_completion_length=MAX_LENGTH,
    )
    sampled = rollout(
        model, tokenizer, prompt_ids, range(len(prompt_ids)), generations=1, **sampling
    )
    assert valid_tokens(sampled) == valid_tokens(greedy)


def test_generate_rollouts_samples_through_rollout_logits_processors(
    model, tokenizer, prompt_ids, monkeypatch
):
    # The chain whose sampling the HashInverseCDFSampler tests check is the one generate receives.
    built, received = [], []

    def recording(*args, **kwargs):
        built.append((args, kwargs, rollout_logits_processors(*args, **kwargs)))
        return built[-1][2]

    generate = model.generate

    def recording_generate(**kwargs):
        received.append(kwargs["logits_processor"])
        return generate(**kwargs)

    monkeypatch.setattr(rollout_module, "rollout_logits_processors", recording)
    monkeypatch.setattr(model, "generate", recording_generate)
    sampling = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "vocab_size": len(tokenizer)}
    row_seeds = rollout_seeds(0, 0, torch.arange(len(prompt_ids)), 2)
    rollout(model, tokenizer, prompt_ids, range(len(prompt_ids)), generations=2, **sampling)
    ((args, kwargs, processors),) = built
    assert args == (max(len(ids) for ids in prompt_ids),)  # the padded prompt length
    assert torch.equal(kwargs.pop("row_seeds"), row_seeds)
    assert kwargs == {**sampling, "record_log_probs": False}
    assert len(received) == 1 and received[0] is processors


def first_eos(row: list[int], eos_token_id: int) -> int | None:
    return row.index(eos_token_id) if eos_token_id in row else None


def check_mask_and_padding(result, eos_token_id: int, pad_token_id: int) -> None:
    for ids, mask, truncated in zip(
        result.completion_ids.tolist(), result.completion_mask.tolist(), result.truncated.tolist()
    ):
        end = first_eos(ids, eos_token_id)
        valid = len(ids) if end is None else end + 1
        assert mask == [True] * valid + [False] * (len(ids) - valid)
        assert ids[valid:] == [pad_token_id] * (len(ids) - valid)
        assert truncated == (end is None)


def test_completion_mask_ends_at_first_eos_and_pads_after(model, tokenizer, prompt_ids):
    result = rollout(model, tokenizer, prompt_ids, range(len(prompt_ids)), generations=4)
    check_mask_and_padding(result, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert result.truncated.any() and not result.truncated.all(), "need rows with and without EOS"


def test_pad_equal_to_eos_gives_the_same_rollouts(model, tokenizer, prompt_ids):
    pad_is_eos = arithmetic_tokenizer()  # a fresh copy: its pad token is replaced
    pad_is_eos.pad_token = pad_is_eos.eos_token
    assert pad_is_eos.pad_token_id == pad_is_eos.eos_token_id
    usual = rollout(model, tokenizer, prompt_ids, range(len(prompt_ids)), generations=4)
    shared = rollout(
        model,
        pad_is_eos,
        prompt_ids,
        range(len(prompt_ids)),
        pad_token_id=pad_is_eos.pad_token_id,
        generations=4,
    )
    check_mask_and_padding(shared, pad_is_eos.eos_token_id, pad_is_eos.pad_token_id)
    # Left padding with the EOS id is masked out: the valid tokens do not change.
    assert valid_tokens(shared) == valid_tokens(usual)
    assert torch.equal(shared.truncated, usual.truncated)
    assert shared.truncated.any() and not shared.truncated.all()


# -- rollout_seeds ------------------------------------------------------------------------------


def test_rollout_seeds_are_distinct_across_steps_prompts_and_generations():
    seeds = torch.stack(
        [rollout_seeds(0, step, torch.arange(200), 8) for step in range(10)]
    )  # [S, P * G]
    assert seeds.dtype == torch.long and seeds.shape == (10, 200 * 8)
    assert torch.unique(seeds).numel() == seeds.numel()
    assert not torch.equal(
        rollout_seeds(0, 0, torch.arange(5), 2), rollout_seeds(1, 0, torch.arange(5), 2)
    )


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 10_000), min_size=1, max_size=20, unique=True),
    st.integers(0, 20),
    st.integers(1, 4),
    st.integers(0, 2**31),
    st.integers(0, 10_000),
)
def test_rollout_seeds_do_not_depend_on_chunking(prompts, cut, generations, seed, step):
    cut = min(cut, len(prompts))
    whole = rollout_seeds(seed, step, torch.tensor(prompts), generations)
    parts = [
        rollout_seeds(seed, step, torch.tensor(chunk, dtype=torch.long), generations)
        for chunk in (prompts[:cut], prompts[cut:])
    ]
    assert torch.equal(torch.cat(parts), whole)
    # Row p * G + g of the batch is the seed of (prompt p, generation g) alone.
    alone = torch.cat([rollout_seeds(seed, step, torch.tensor([p]), generations) for p in prompts])
    assert torch.equal(alone, whole)


# -- PromptSampler ------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_prompts", "per_step"), [(10, 4), (7, 3), (5, 8), (6, 6)])
def test_prompt_sampler_epochs_are_permutations(num_prompts, per_step):
    sampler = PromptSampler(num_prompts, per_step, seed=3)
    steps = num_prompts * 3  # a whole number of epochs: 3 * per_step of them
    order = torch.cat([sampler.indices(step) for step in range(steps)])  # [steps * per_step]
    assert all(sampler.indices(step).shape == (per_step,) for step in range(3))
    for epoch in order.reshape(-1, num_prompts):
        assert sorted(epoch.tolist()) == list(range(num_prompts))


def test_prompt_sampler_depends_only_on_seed_and_step():
    first, second = PromptSampler(20, 6, seed=5), PromptSampler(20, 6, seed=5)
    torch.manual_seed(0)
    forward = [first.indices(step).tolist() for step in range(12)]
    torch.manual_seed(99)
    torch.rand(10)
    backward = [second.indices(step).tolist() for step in reversed(range(12))][::-1]
    assert forward == backward
    flat = [index for indices in forward for index in indices]
    assert flat[:20] != flat[20:40]  # each epoch has its own order


def test_prompt_sampler_seeds_give_different_orders():
    orders = {
        tuple(torch.cat([PromptSampler(20, 5, seed).indices(s) for s in range(4)]).tolist())
        for seed in range(5)
    }
    assert len(orders) == 5


def _class_rollouts(tokenizer, completions: list[str]) -> Rollouts:
    """Right-padded completions, each closed by EOS, as ``Rollouts``."""
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in completions]
    rows = [ids + [tokenizer.eos_token_id] for ids in rows]
    width = max(len(ids) for ids in rows)
    ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in rows])
    mask = torch.arange(width) < torch.tensor([len(ids) for ids in rows]).unsqueeze(1)
    return Rollouts(ids, mask, torch.arange(len(rows)), torch.zeros(len(rows), dtype=torch.bool))


def test_completion_token_classes_label_every_valid_token_and_only_those(tokenizer):
    rollouts = _class_rollouts(tokenizer, ["1+2=3", "7=", ""])
    seen = []

    def roles(tokens: list[str]) -> list[str]:
        seen.append(tokens)
        return ["digit" if token.isdigit() else "format" for token in tokens]

    classes = completion_token_classes(rollouts, tokenizer, roles, ("format", "digit"))
    eos = tokenizer.eos_token
    assert seen == [["1", "+", "2", "=", "3", eos], ["7", "=", eos], [eos]]
    assert classes.tolist() == [
        [1, 0, 1, 0, 1, 0],
        [1, 0, 0, -1, -1, -1],
        [0, -1, -1, -1, -1, -1],
    ]


def test_completion_token_classes_refuse_what_routing_cannot_read(tokenizer):
    rollouts = _class_rollouts(tokenizer, ["1+2="])
    with pytest.raises(ConfigError, match="'mystery'.*not a key of objective.oracle_regimes"):
        completion_token_classes(rollouts, tokenizer, lambda t: ["mystery"] * len(t), ("format",))
    with pytest.raises(ConfigError, match="token_roles returned None"):
        completion_token_classes(rollouts, tokenizer, lambda t: None, ("format",))
    with pytest.raises(DOPDError, match="returned 1 classes for a completion of 5 tokens"):
        completion_token_classes(rollouts, tokenizer, lambda t: ["format"], ("format",))
