"""On-policy rollouts: sample completions from the current student with ``generate`` (KV cache).

Sampling is a pure function of ``(seed, step, prompt id, generation index, position)``: an
inverse-CDF sampler draws one uniform per position from a counter-based hash instead of the global
RNG. Every rollout is therefore the same however prompts are split across micro-batches, ranks,
generation batches or resumed runs, which is what makes a 2-process run equal a 1-process run and
a resumed run equal an uninterrupted one. Inverse CDF over the softmax of the warped logits is
exact sampling from it. ``rollout.backend: vllm`` samples through ``dopd.training.backends``
instead, with the same per-row seeds but another sampler.

When the student's output head is padded past the run's common vocabulary (a smaller teacher
head, ``dopd.modeling.loading.common_vocabulary``), the padded columns are masked to -inf before
anything else, so no rollout holds an id that another view cannot score.

``completion_token_classes`` labels each sampled token with its true class, for objectives that
route on it (the oracle-routing control on a synthetic task that knows its tokens' roles).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
from dopd.modeling.vlm_views import RowImages, vision_token_ids


def rollout_seeds(seed: int, step: int, prompt_ids: Tensor, num_generations: int) -> Tensor:
    """``[P * G]`` int64 seed per rollout row, rows ordered prompt-major like ``generate``.

    Args:
        prompt_ids: ``[P]`` long, dataset indices of the prompts (global, rank-independent).
    """
    generation = torch.arange(num_generations, dtype=torch.long)
    rows = prompt_ids.long().unsqueeze(-1) * 1_000_003 + generation  # [P, G]
    return splitmix(splitmix(rows.flatten() + step * 2_147_483_647) + seed)


class VocabularyMask(LogitsProcessor):
    """Sets the logits ``[B, V_model]`` of ids ``>= vocab_size`` and of ``suppress_ids`` (a
    vision-language model's image placeholders) to -inf, so they are never generated; returns
    the scores themselves when there is nothing to mask."""

    def __init__(self, vocab_size: int, suppress_ids: Sequence[int] = ()):
        self.vocab_size, self.suppress_ids = vocab_size, sorted(set(suppress_ids))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        masked = list(range(self.vocab_size, scores.shape[-1])) + [
            i for i in self.suppress_ids if i < min(self.vocab_size, scores.shape[-1])
        ]
        if not masked:
            return scores
        padded = torch.tensor(masked, dtype=torch.long, device=scores.device)
        # Out of place: generate may keep the scores it passes in (output_scores).
        return scores.index_fill(-1, padded, float("-inf"))  # [B, V_model]


class HashInverseCDFSampler(LogitsProcessor):
    """Samples one token per row from the softmax of the warped scores by inverse CDF, with one
    hashed uniform per row and position; returns scores that are 0 at the sampled id and -inf
    elsewhere, so that greedy ``generate`` takes it.

    The uniform ``u`` is a pure function of ``(row seed, position)``, so a row's tokens do not
    depend on the batch it is in. The sampled id is the first whose cumulative probability exceeds
    ``u`` times the total mass, found in two levels: blocks of ``BLOCK`` ids (their float32 masses
    cumulated in float64), then the ids of one block (float64). That is exact sampling from the
    float32 softmax, at the cost of one softmax per position, and ids of zero probability
    (masked, or cut by top-k/top-p) are never taken.

    Args:
        row_seeds: ``[B]`` int64, one per rollout row.
        prompt_length: padded prompt length; the position key is the number of tokens generated
            so far, which does not depend on how much padding the batch needed.
        record_log_probs: keep ``log_probs``, the model's log-probability (before warping) of
            each sampled token, one ``[B]`` tensor per position.
    """

    BLOCK = 128

    def __init__(self, row_seeds: Tensor, prompt_length: int, *, record_log_probs: bool = False):
        self.row_seeds = row_seeds
        self.prompt_length = prompt_length
        self.raw_scores: Tensor | None = None  # set by _KeepRawScores when warpers run first
        self.log_probs: list[Tensor] | None = [] if record_log_probs else None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        position = input_ids.shape[1] - self.prompt_length
        uniforms = hash_uniform(splitmix(self.row_seeds.to(scores.device) + position))  # [B]
        sampled = self.draw(scores.float().softmax(-1), uniforms)  # [B, 1]
        if self.log_probs is not None:
            raw = (scores if self.raw_scores is None else self.raw_scores).float()
            self.log_probs.append(
                (raw.gather(-1, sampled) - raw.logsumexp(-1, keepdim=True)).squeeze(-1)
            )
        return torch.full_like(scores, float("-inf")).scatter_(-1, sampled, 0.0)

    @classmethod
    def draw(cls, probs: Tensor, uniforms: Tensor) -> Tensor:
        """``[B, 1]`` ids: per row, the first id whose cumulative mass exceeds ``u * total``.

        Args:
            probs: ``[B, V]`` float32 non-negative masses (a softmax; zeros are never drawn).
            uniforms: ``[B]`` float64 in (0, 1).
        """
        rows, vocab = probs.shape
        padded = F.pad(probs, (0, -vocab % cls.BLOCK))  # [B, K * BLOCK], zero mass appended
        blocks = padded.view(rows, -1, cls.BLOCK)  # [B, K, BLOCK]
        block_cumulative = blocks.sum(-1).double().cumsum(-1)  # [B, K]
        target = (uniforms.to(probs.device) * block_cumulative[:, -1]).unsqueeze(-1)  # [B, 1]
        # u * total can round up to the total: the last block then, where the clamp below applies.
        block = torch.searchsorted(block_cumulative, target, right=True).clamp_max(
            blocks.shape[1] - 1
        )  # [B, 1]
        before = block_cumulative.gather(-1, (block - 1).clamp_min(0)) * (block > 0)  # [B, 1]
        inside = blocks.gather(1, block.unsqueeze(-1).expand(-1, -1, cls.BLOCK)).squeeze(1)
        inner_cumulative = inside.double().cumsum(-1)  # [B, BLOCK]
        offset = torch.searchsorted(inner_cumulative, target - before, right=True)  # [B, 1]
        # Float rounding between the block's sum and its cumulative sum can leave the remainder
        # at or past the block's mass: take the block's last id of positive mass then.
        last = ((inside > 0).cumsum(-1)).argmax(-1, keepdim=True)  # [B, 1]
        return block * cls.BLOCK + torch.minimum(offset, last)


class _KeepRawScores(LogitsProcessor):
    """Hands the unwarped scores to the sampler, which reports log-probabilities from them."""

    def __init__(self, sampler: HashInverseCDFSampler):
        self.sampler = sampler

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.sampler.raw_scores = scores
        return scores


def rollout_logits_processors(
    prompt_length: int,
    *,
    row_seeds: Tensor | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    vocab_size: int | None = None,
    record_log_probs: bool = False,
    suppress_ids: Sequence[int] = (),
) -> LogitsProcessorList:
    """The logits processors ``generate_rollouts`` hands to ``generate``, in the order they run.

    Each processor maps ``(input_ids [B, L], scores [B, V_model]) -> scores [B, V_model]``, where
    ``L`` is ``prompt_length`` plus the tokens generated so far. The chain is: ``VocabularyMask``
    (only with ``vocab_size`` or ``suppress_ids``), then, when sampling (``row_seeds`` given),
    temperature (unless 1.0), top-k (unless 0), top-p (unless 1.0) and last
    ``HashInverseCDFSampler``, whose argmax (what greedy ``generate`` takes) is a sample from the
    softmax of the warped scores. Without ``row_seeds`` only the mask remains, and the argmax is
    greedy decoding.

    Args:
        prompt_length: padded prompt length ``L_prompt`` of the batch, the position origin of
            the sampler's hash keys.
        row_seeds: ``[B]`` int64 from ``rollout_seeds``; None decodes greedily.
        vocab_size: the run's common vocabulary; ids ``>= vocab_size`` are masked first.
        record_log_probs: the sampler keeps each sampled token's log-probability under the
            model's distribution over the common vocabulary, before temperature, top-k and top-p.
        suppress_ids: ids never generated, masked with the padded ids (without ``vocab_size``
            alone: greedy evaluation of a vision-language model).
    """
    processors = LogitsProcessorList()
    if vocab_size is not None or suppress_ids:
        processors.append(
            VocabularyMask(sys.maxsize if vocab_size is None else vocab_size, suppress_ids)
        )
    if row_seeds is not None:
        sampler = HashInverseCDFSampler(row_seeds, prompt_length, record_log_probs=record_log_probs)
        warpers = [
            *([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []),
            *([TopKLogitsWarper(top_k)] if top_k > 0 else []),
            *([TopPLogitsWarper(top_p)] if top_p < 1.0 else []),
        ]
        if warpers and record_log_probs:
            processors.append(_KeepRawScores(sampler))
        processors.extend([*warpers, sampler])
    return processors


@dataclass
class Rollouts:
    """Completions of one batch of prompts.

    Attributes:
        completion_ids: ``[B, T]`` long, right-padded with the pad id.
        completion_mask: ``[B, T]`` bool, valid up to and including the first EOS.
        prompt_index: ``[B]`` long, which prompt of the batch each row answers.
        truncated: ``[B]`` bool, True where no EOS was produced within the length budget.
        sampled_log_probs: ``[B, T]`` float32, the sampling engine's log-probability of each
            sampled token under the model's own distribution (before temperature, top-k and
            top-p), 0 at padding; None when not recorded (greedy decoding). The trainer compares
            it with its own (the ``mismatch/*`` metrics of ``dopd.training.step``).
    """

    completion_ids: Tensor
    completion_mask: Tensor
    prompt_index: Tensor
    truncated: Tensor
    sampled_log_probs: Tensor | None = None


def finish_rollouts(
    completions: Sequence[Sequence[int]],
    num_prompts: int,
    num_generations: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    log_probs: Sequence[Sequence[float]] | None = None,
    device: torch.device | str = "cpu",
) -> Rollouts:
    """``Rollouts`` from per-row completion ids (prompt-major, any lengths): right-padded to the
    longest, masked after the first EOS (ids after it become the pad id).

    Every backend returns its completions through here, so EOS and padding rules are one.

    Args:
        completions: ``B = num_prompts * num_generations`` id sequences.
        log_probs: per row, one log-probability per id (same lengths), or None.
    """
    length = max((len(row) for row in completions), default=0)
    ids = torch.full((len(completions), max(length, 1)), pad_token_id, dtype=torch.long)
    for row, tokens in enumerate(completions):
        ids[row, : len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
    ids = ids[:, :length].to(device)  # [B, T]
    sampled = None
    if log_probs is not None:
        sampled = torch.zeros(ids.shape, dtype=torch.float32)
        for row, values in enumerate(log_probs):
            sampled[row, : len(values)] = torch.as_tensor(list(values), dtype=torch.float32)
        sampled = sampled.to(device)
    return _masked_rollouts(ids, num_prompts, num_generations, eos_token_id, pad_token_id, sampled)


def _masked_rollouts(
    ids: Tensor,
    num_prompts: int,
    num_generations: int,
    eos_token_id: int,
    pad_token_id: int,
    sampled_log_probs: Tensor | None,
) -> Rollouts:
    mask = completion_mask_after_eos(ids, eos_token_id)  # [B, T]
    truncated = ~(ids == eos_token_id).any(-1)
    prompt_index = torch.arange(num_prompts, device=ids.device).repeat_interleave(num_generations)
    if sampled_log_probs is not None:
        sampled_log_probs = sampled_log_probs.masked_fill(~mask, 0.0)
    return Rollouts(
        ids.masked_fill(~mask, pad_token_id), mask, prompt_index, truncated, sampled_log_probs
    )


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
    generation_batch_size: int = 0,
    record_log_probs: bool = False,
    synced: bool = False,
    images: RowImages | None = None,
) -> Rollouts:
    """Sample ``num_generations`` completions per prompt with HF ``generate`` (greedy when
    ``row_seeds`` is None).

    Args:
        model: a Hugging Face causal LM (unwrapped).
        prompt_ids: ``P`` token-id lists, not padded.
        row_seeds: ``[P * num_generations]`` int64 from ``rollout_seeds``; None decodes greedily.
        vocab_size: the run's common vocabulary; when the model's head is larger, ids
            ``>= vocab_size`` are masked (first, before temperature, top-k, top-p and sampling).
        generation_batch_size: rows per ``generate`` call (bounds the KV cache); 0 = all at once.
            The completions do not depend on it: each row's draws are keyed by its seed.
        record_log_probs: fill ``Rollouts.sampled_log_probs`` (sampling only).
        synced: every rank keeps running forwards until all ranks' rows are done (``generate``'s
            ``synced_gpus``). A sharded (FSDP2) model needs it: each forward gathers parameters
            from every rank, so all ranks must take the same number of decoding steps.
        images: a vision-language model's ``P`` image rows, one per prompt (repeated here for
            each generation): ``generate`` gets each chunk's ``pixel_values``,
            ``image_grid_thw`` and ``mm_token_type_ids``, and the vision tokens
            (``vlm_views.vision_token_ids``) are never sampled.

    Returns:
        ``Rollouts`` with ``B = P * num_generations`` rows, prompt-major.
    """
    device = next(model.parameters()).device
    repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
    step = generation_batch_size or max(len(repeated), 1)
    config = GenerationConfig(
        max_new_tokens=max_completion_length,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    completions: list[Tensor] = []
    log_probs: list[Tensor] = []
    suppress, row_images = (), None
    if images is not None:
        suppress = vision_token_ids(model.config)
        repeated_images = [images.select(slice(p, p + 1)) for p in range(len(prompt_ids))]
        row_images = RowImages.from_rows(
            [
                (one.pixel_values, one.image_grid_thw)
                for one in repeated_images
                for _ in range(num_generations)
            ]
        )
    for start in range(0, len(repeated), step):
        input_ids, attention_mask = left_pad(repeated[start : start + step], pad_token_id, device)
        extra = {}
        if row_images is not None:
            chunk = row_images.select(slice(start, start + step)).to(device)
            extra = {
                "pixel_values": chunk.pixel_values,
                "image_grid_thw": chunk.image_grid_thw,
                "mm_token_type_ids": (input_ids == model.config.image_token_id).long(),
            }
        processors = rollout_logits_processors(
            input_ids.shape[1],
            row_seeds=None if row_seeds is None else row_seeds[start : start + step],
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            vocab_size=vocab_size,
            record_log_probs=record_log_probs,
            **({"suppress_ids": suppress} if suppress else {}),
        )
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=processors,
            synced_gpus=synced,
            **extra,
        )
        completions.append(output[:, input_ids.shape[1] :])  # [b, T_chunk]
        sampler = processors[-1] if processors else None
        if isinstance(sampler, HashInverseCDFSampler) and sampler.log_probs is not None:
            log_probs.append(torch.stack(sampler.log_probs, -1))  # [b, T_chunk]
    length = max(chunk.shape[1] for chunk in completions)
    ids = torch.cat(
        [F.pad(chunk, (0, length - chunk.shape[1]), value=pad_token_id) for chunk in completions]
    )  # [B, T]
    sampled = (
        torch.cat([F.pad(chunk, (0, length - chunk.shape[1])) for chunk in log_probs])
        if log_probs
        else None
    )
    return _masked_rollouts(
        ids, len(prompt_ids), num_generations, eos_token_id, pad_token_id, sampled
    )


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


class PromptSampler:
    """Which dataset prompts step ``s`` trains on: a seeded permutation per epoch, walked in
    order, so the schedule depends only on ``(seed, step)`` (resumable, rank-independent)."""

    def __init__(self, num_prompts: int, prompts_per_step: int, seed: int):
        self.num_prompts, self.prompts_per_step, self.seed = num_prompts, prompts_per_step, seed

    def indices(self, step: int) -> torch.Tensor:
        """``[prompts_per_step]`` long dataset indices of step ``step``."""
        positions = step * self.prompts_per_step + torch.arange(self.prompts_per_step)
        epochs, offsets = positions // self.num_prompts, positions % self.num_prompts
        orders = {
            int(e): torch.randperm(
                self.num_prompts, generator=torch.Generator().manual_seed(self.seed * 7919 + int(e))
            )
            for e in epochs.unique()
        }
        return torch.stack([orders[int(e)][o] for e, o in zip(epochs, offsets)])
