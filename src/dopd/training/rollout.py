"""On-policy rollouts: sample completions from the current student with ``generate`` (KV cache).

Sampling is a pure function of ``(seed, step, prompt id, generation index, position)``: a
Gumbel-max sampler draws its uniforms from a counter-based hash instead of the global RNG. Every
rollout is therefore the same however prompts are split across micro-batches, ranks or resumed
runs, which is what makes a 2-process run equal a 1-process run and a resumed run equal an
uninterrupted one. Gumbel-max over the warped logits is exact sampling from their softmax.

When the student's output head is padded past the run's common vocabulary (a smaller teacher
head, ``dopd.modeling.loading.common_vocabulary``), the padded columns are masked to -inf before
anything else, so no rollout holds an id that another view cannot score.

``completion_token_classes`` labels each sampled token with its true class, for objectives that
route on it (the oracle-routing control on a synthetic task that knows its tokens' roles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dopd.errors import ConfigError, DOPDError
from dopd.hashing import hash_uniform, splitmix
from dopd.modeling.alignment import completion_mask_after_eos, left_pad


def rollout_seeds(seed: int, step: int, prompt_ids: Tensor, num_generations: int) -> Tensor:
    """``[P * G]`` int64 seed per rollout row, rows ordered prompt-major like ``generate``.

    Args:
        prompt_ids: ``[P]`` long, dataset indices of the prompts (global, rank-independent).
    """
    generation = torch.arange(num_generations, dtype=torch.long)
    rows = prompt_ids.long().unsqueeze(-1) * 1_000_003 + generation  # [P, G]
    return splitmix(splitmix(rows.flatten() + step * 2_147_483_647) + seed)


class VocabularyMask(LogitsProcessor):
    """Sets the logits ``[B, V_model]`` of ids ``>= vocab_size`` to -inf, so they are never
    generated; returns the scores themselves when the head has no such ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[-1] <= self.vocab_size:
            return scores
        padded = torch.arange(self.vocab_size, scores.shape[-1], device=scores.device)
        # Out of place: generate may keep the scores it passes in (output_scores).
        return scores.index_fill(-1, padded, float("-inf"))  # [B, V_model]


class HashGumbelSampler(LogitsProcessor):
    """Adds hash-derived Gumbel noise so that greedy decoding samples from the warped logits.

    Args:
        row_seeds: ``[B]`` int64, one per rollout row.
        prompt_length: padded prompt length; the position key is the number of tokens generated
            so far, which does not depend on how much padding the batch needed.
    """

    def __init__(self, row_seeds: Tensor, prompt_length: int):
        self.row_seeds = row_seeds
        self.prompt_length = prompt_length

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        position = input_ids.shape[1] - self.prompt_length
        vocab = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.long)
        row_keys = splitmix(self.row_seeds.to(scores.device) + position).unsqueeze(-1)  # [B, 1]
        uniforms = hash_uniform(row_keys ^ vocab)  # [B, V]
        gumbel = -torch.log(-torch.log(uniforms))
        return scores.log_softmax(-1) + gumbel.to(scores.dtype)


def rollout_logits_processors(
    prompt_length: int,
    *,
    row_seeds: Tensor | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    vocab_size: int | None = None,
) -> LogitsProcessorList:
    """The logits processors ``generate_rollouts`` hands to ``generate``, in the order they run.

    Each processor maps ``(input_ids [B, L], scores [B, V_model]) -> scores [B, V_model]``, where
    ``L`` is ``prompt_length`` plus the tokens generated so far. The chain is: ``VocabularyMask``
    (only with ``vocab_size``), then, when sampling (``row_seeds`` given), temperature (unless
    1.0), top-k (unless 0), top-p (unless 1.0) and last ``HashGumbelSampler``, whose argmax (what
    greedy ``generate`` takes) is a sample from the softmax of the warped scores. Without
    ``row_seeds`` only the mask remains, and the argmax is greedy decoding.

    Args:
        prompt_length: padded prompt length ``L_prompt`` of the batch, the position origin of
            the sampler's hash keys.
        row_seeds: ``[B]`` int64 from ``rollout_seeds``; None decodes greedily.
        vocab_size: the run's common vocabulary; ids ``>= vocab_size`` are masked first.
    """
    processors = LogitsProcessorList()
    if vocab_size is not None:
        processors.append(VocabularyMask(vocab_size))
    if row_seeds is not None:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(HashGumbelSampler(row_seeds, prompt_length))
    return processors


@dataclass
class Rollouts:
    """Completions of one batch of prompts.

    Attributes:
        completion_ids: ``[B, T]`` long, right-padded with the pad id.
        completion_mask: ``[B, T]`` bool, valid up to and including the first EOS.
        prompt_index: ``[B]`` long, which prompt of the batch each row answers.
        truncated: ``[B]`` bool, True where no EOS was produced within the length budget.
    """

    completion_ids: Tensor
    completion_mask: Tensor
    prompt_index: Tensor
    truncated: Tensor


@torch.no_grad()
def generate_rollouts(
    model,
    prompt_ids: list[list[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_completion_length: int,
    num_generations: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    row_seeds: Tensor | None = None,
    vocab_size: int | None = None,
) -> Rollouts:
    """Sample ``num_generations`` completions per prompt (greedy when ``row_seeds`` is None).

    Args:
        model: a Hugging Face causal LM (unwrapped).
        prompt_ids: ``P`` token-id lists, not padded.
        row_seeds: ``[P * num_generations]`` int64 from ``rollout_seeds``; None decodes greedily.
        vocab_size: the run's common vocabulary; when the model's head is larger, ids
            ``>= vocab_size`` are masked (first, before temperature, top-k, top-p and sampling).

    Returns:
        ``Rollouts`` with ``B = P * num_generations`` rows, prompt-major.
    """
    device = next(model.parameters()).device
    repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
    input_ids, attention_mask = left_pad(repeated, pad_token_id, device)
    processors = rollout_logits_processors(
        input_ids.shape[1],
        row_seeds=row_seeds,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        vocab_size=vocab_size,
    )
    config = GenerationConfig(
        max_new_tokens=max_completion_length,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        logits_processor=processors,
    )
    completion_ids = output[:, input_ids.shape[1] :]  # [B, T]
    mask = completion_mask_after_eos(completion_ids, eos_token_id)
    truncated = ~torch.isin(
        completion_ids, torch.as_tensor(eos_token_id, device=completion_ids.device)
    ).any(-1)
    prompt_index = torch.arange(len(prompt_ids), device=device).repeat_interleave(num_generations)
    return Rollouts(completion_ids.masked_fill(~mask, pad_token_id), mask, prompt_index, truncated)


def completion_token_classes(
    rollouts: Rollouts,
    tokenizer,
    token_roles: Callable[[list[str]], list[str] | None],
    class_names: Sequence[str],
    key: str = "objective.oracle_regimes",
) -> Tensor:
    """Each valid completion token's true class, as an index into ``class_names``.

    ``token_roles`` (e.g. a lab task's ``Task.token_roles``) is called once per row on the tokens
    of its valid completion ids (the closing EOS included), as
    ``tokenizer.convert_ids_to_tokens`` spells them, and returns one class name per token.

    Args:
        rollouts: ``B`` completions of ``T`` positions.
        tokenizer: the run's tokenizer.
        token_roles: ``list[str] -> list[str]`` of the same length.
        class_names: the classes the objective maps (``Objective.token_class_names``).
        key: the config key that lists the classes, named when a class is missing from it.

    Returns:
        ``[B, T]`` long on the rollouts' device, -1 at padding.
    """
    index = {name: position for position, name in enumerate(class_names)}
    ids_by_row, valid_by_row = rollouts.completion_ids.tolist(), rollouts.completion_mask.tolist()
    classes = torch.full(rollouts.completion_ids.shape, -1, dtype=torch.long)  # [B, T]
    for row, (ids, valid) in enumerate(zip(ids_by_row, valid_by_row)):
        tokens = tokenizer.convert_ids_to_tokens([i for i, keep in zip(ids, valid) if keep])
        roles = token_roles(tokens)
        if roles is None:
            raise ConfigError(
                f"{key}: token_roles returned None (the task labels no token classes), so "
                "routing cannot read them; use a task that defines token_roles"
            )
        if len(roles) != len(tokens):
            raise DOPDError(
                f"token_roles returned {len(roles)} classes for a completion of {len(tokens)} "
                "tokens; it must return one class per token"
            )
        unknown = sorted({role for role in roles if role not in index})
        if unknown:
            raise ConfigError(
                f"token class {unknown[0]!r} (from token_roles) is not a key of {key} "
                f"(keys: {', '.join(class_names)}); map every class the task labels to a regime"
            )
        positions = [t for t, keep in enumerate(valid) if keep]
        classes[row, positions] = torch.tensor([index[role] for role in roles], dtype=torch.long)
    return classes.to(rollouts.completion_ids.device)
