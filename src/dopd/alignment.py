"""Token alignment of the model views: one completion, scored after different prompts.

Every view (student, privileged student, teacher) is the batch ``[left-padded prompt | the
identical completion ids]``. The completion is never decoded and re-tokenized, so completion
position ``t`` holds the same token in every view and the per-token logits line up (METHOD.md
section 9). Left padding is invisible to the model: it is masked out of attention and
``position_ids`` restart at 0 on the first real token, so each row scores exactly as it would
alone and unpadded.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dopd.errors import DOPDError


def completion_mask_after_eos(
    completion_ids: Tensor, eos_token_id: int | Sequence[int] | None
) -> Tensor:
    """Valid completion positions: up to and including the first EOS of each row.

    Validity comes from the first EOS alone, never from ``!= pad``, so it is right when the pad
    id equals the EOS id and when a sampler kept generating after EOS.

    Args:
        completion_ids: ``[B, T]`` long.
        eos_token_id: one id, several ids (any of them ends a row), or None (all positions valid).

    Returns:
        ``[B, T]`` bool.
    """
    if eos_token_id is None:
        return torch.ones_like(completion_ids, dtype=torch.bool)
    eos_ids = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos_ids).long()  # [B, T]
    eos_before = is_eos.cumsum(dim=-1) - is_eos  # [B, T] EOS count strictly before t
    return eos_before == 0


@dataclass(frozen=True)
class ViewInputs:
    """One view's model inputs, ``[left-padded prompt (P) | completion (T)]``.

    Attributes:
        input_ids: ``[B, P + T]`` long; padding and invalid completion positions hold the pad id.
        attention_mask: ``[B, P + T]`` long, 1 on real prompt tokens and valid completion tokens.
        position_ids: ``[B, P + T]`` long, 0 at each row's first real token.
        completion_length: ``T``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    completion_length: int

    @property
    def completion_mask(self) -> Tensor:
        """``[B, T]`` bool, the valid completion positions of this view."""
        return self.attention_mask[:, -self.completion_length :].bool()


def build_view_inputs(
    prompt_ids: list[list[int]], completion_ids: Tensor, completion_mask: Tensor, pad_token_id: int
) -> ViewInputs:
    """Place each row's prompt, left-padded, before the identical completion ids.

    Args:
        prompt_ids: ``B`` unpadded, non-empty prompt id lists (this view's prompts).
        completion_ids: ``[B, T]`` long, the sampled completions shared by all views.
        completion_mask: ``[B, T]`` bool, a prefix of each row (e.g. ``completion_mask_after_eos``).
        pad_token_id: id written into padding; it never reaches attention.
    """
    _check_view_arguments(prompt_ids, completion_ids, completion_mask)
    prompt, prompt_attention = left_pad(prompt_ids, pad_token_id, completion_ids.device)  # [B, P]
    completion = completion_ids.long().masked_fill(~completion_mask, pad_token_id)  # [B, T]
    input_ids = torch.cat([prompt, completion], dim=1)  # [B, P + T]
    attention_mask = torch.cat([prompt_attention, completion_mask.long()], dim=1)  # [B, P + T]
    # Positions count real tokens only, so left padding does not shift the rotary positions.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, P + T]
    return ViewInputs(input_ids, attention_mask, position_ids, completion_ids.shape[1])


def left_pad(sequences: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``[B, L]`` long ids and attention mask of ``sequences`` padded on the left to one length."""
    width = max(len(ids) for ids in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, L]
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def _check_view_arguments(
    prompt_ids: list[list[int]], completion_ids: Tensor, mask: Tensor
) -> None:
    shape = tuple(completion_ids.shape)
    if len(shape) != 2 or shape[1] == 0 or tuple(mask.shape) != shape or mask.dtype != torch.bool:
        raise DOPDError(
            f"completion_ids {shape} and completion_mask {tuple(mask.shape)} {mask.dtype} "
            "must both be [B, T] with T >= 1, the mask bool"
        )
    if len(prompt_ids) != completion_ids.shape[0]:
        raise DOPDError(
            f"{len(prompt_ids)} prompts for {completion_ids.shape[0]} completions; pass one per row"
        )
    empty = [row for row, ids in enumerate(prompt_ids) if not ids]
    if empty:
        raise DOPDError(
            f"prompt rows {empty} are empty; every prompt needs a token to score completion token 0"
        )
    # A hole in the mask would silently shift every later position of that row.
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise DOPDError(
            "completion_mask has a valid token after an invalid one; "
            "it must be a prefix of each row"
        )


def check_aligned(*masks: Tensor) -> None:
    """Raise ``DOPDError`` unless all views' ``[B, T]`` completion masks count the same valid
    tokens in every row (the guard against views that disagree on the completion)."""
    counts = [mask.sum(dim=-1) for mask in masks]  # each [B]
    for index, count in enumerate(counts[1:], start=1):
        if count.shape != counts[0].shape or not torch.equal(count, counts[0]):
            raise DOPDError(
                f"view {index} has valid-token counts {count.tolist()} but view 0 has "
                f"{counts[0].tolist()}; build every view from the same completion_ids "
                "and completion_mask"
            )


def completion_logits(model: torch.nn.Module, inputs: ViewInputs) -> Tensor:
    """Logits scoring each completion token: position ``t`` is the distribution of token ``t``.

    These are the model's outputs at sequence positions ``P - 1 .. P + T - 2`` (the token before
    each completion token). Logits at invalid completion positions are finite but meaningless.

    Returns:
        ``[B, T, V]`` in the model's dtype.
    """
    length = inputs.completion_length
    outputs = model(
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
        use_cache=False,
        **_logits_to_keep(model, length + 1),
    )
    return outputs.logits[:, -(length + 1) : -1]  # [B, T, V]


def _logits_to_keep(model: torch.nn.Module, count: int) -> dict[str, int]:
    """Ask for the last ``count`` positions only, so the vocabulary projection skips the prompt.

    transformers' own ``generate`` tests the signature the same way: not every architecture takes
    ``logits_to_keep``; those return every position and the caller's slice still applies.
    """
    forward = getattr(model, "module", model).forward  # DDP-style wrappers hide the signature
    return (
        {"logits_to_keep": count}
        if "logits_to_keep" in inspect.signature(forward).parameters
        else {}
    )
