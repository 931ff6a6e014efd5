"""Token alignment of the model views: one completion, scored after different prompts.

Every view (student, privileged student, teacher) is the batch ``[left-padded prompt | the
identical completion ids]``. The completion is never decoded and re-tokenized, so completion
position ``t`` holds the same token in every view and the per-token logits line up (docs/method.md
§9). Left padding is invisible to the model: it is masked out of attention and
``position_ids`` restart at 0 on the first real token, so each row scores exactly as it would
alone and unpadded.

A view is scored either as logits (``completion_logits``, ``[B, T, V]``) or as the final hidden
states its output head would project (``completion_hidden_states``, ``[B, T, H]``, with the head's
weight), which the chunked loss projects a few rows at a time. Both take ``vocab_size``: the
common vocabulary of the run's heads (``dopd.modeling.loading.common_vocabulary``), to which a
padded head is cut so that every view scores the same ``V`` ids.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dopd.errors import DOPDError
from dopd.modeling.peft import peft_base
from dopd.objectives.views import ViewHead


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
        model_kwargs: further forward inputs of a vision-language view (``pixel_values``
            ``[N, D]``, ``image_grid_thw`` ``[I, 3]``, ``mm_token_type_ids`` ``[B, P + T]``:
            ``dopd.modeling.vlm_views.with_images``), or None. When given, ``position_ids`` are
            not passed: Qwen-VL computes its multimodal RoPE itself, and 1-D positions would
            misplace the image tokens.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    completion_length: int
    model_kwargs: dict[str, Tensor] | None = None

    @property
    def completion_mask(self) -> Tensor:
        """``[B, T]`` bool, the valid completion positions of this view."""
        return self.attention_mask[:, -self.completion_length :].bool()

    def forward_inputs(self) -> dict[str, Tensor]:
        """The keyword arguments of the model's forward: ids, attention mask and either the
        text positions or the view's ``model_kwargs``."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.model_kwargs is None:
            return {**inputs, "position_ids": self.position_ids}
        return {**inputs, **self.model_kwargs}


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


def left_pad(
    sequences: list[list[int]], pad_token_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
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


def completion_logits(
    model: torch.nn.Module, inputs: ViewInputs, vocab_size: int | None = None
) -> Tensor:
    """Logits scoring each completion token: position ``t`` is the distribution of token ``t``.

    These are the model's outputs at sequence positions ``P - 1 .. P + T - 2`` (the token before
    each completion token). Logits at invalid completion positions are finite but meaningless.

    Args:
        vocab_size: keep the first ``vocab_size`` columns (the run's common vocabulary, at most
            the head's size ``V_model``); None or ``V_model`` keeps them all, without a copy.

    Returns:
        ``[B, T, V]`` in the model's dtype, ``V = vocab_size or V_model``.
    """
    length = inputs.completion_length
    outputs = model(
        **inputs.forward_inputs(),
        use_cache=False,
        **_logits_to_keep(model, length + 1),
    )
    logits = outputs.logits[:, -(length + 1) : -1]  # [B, T, V_model]
    keep = vocabulary_slice(logits.shape[-1], vocab_size)
    return logits if keep is None else logits[..., keep]  # [B, T, V]


def vocabulary_slice(size: int, vocab_size: int | None) -> slice | None:
    """The rows of a ``size``-row output head that the common vocabulary keeps.

    None when nothing is cut (``vocab_size`` None or ``size``), so that a run whose heads all have
    one size does exactly what it did before the rule existed: no slice, no autograd node.

    Raises:
        DOPDError: ``vocab_size`` is not in ``1 .. size``.
    """
    if vocab_size is None or vocab_size == size:
        return None
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size < size:
        raise DOPDError(
            f"vocab_size={vocab_size!r} cannot cut an output head of {size} rows; pass the common "
            "vocabulary of the run's heads (dopd.modeling.loading.common_vocabulary), "
            "at most each head's size"
        )
    return slice(0, vocab_size)


def _logits_to_keep(model: torch.nn.Module, count: int) -> dict[str, int]:
    """Ask for the last ``count`` positions only, so the vocabulary projection skips the prompt.

    transformers' own ``generate`` tests the signature the same way: not every architecture takes
    ``logits_to_keep``; those return every position and the caller's slice still applies.
    """
    forward = unwrapped(model).forward  # DDP-style wrappers hide the signature
    return (
        {"logits_to_keep": count}
        if "logits_to_keep" in inspect.signature(forward).parameters
        else {}
    )


# Config fields with which transformers families change the logits after the output head
# (Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's
# lm_head_multiplier, ...), each with its value that leaves the logits unchanged; None does too.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": 0.0,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "output_multiplier": 1.0,
    "lm_head_multiplier": 1.0,
}


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP-style (``.module``), ``torch.compile`` (``._orig_mod``) and LoRA
    (``dopd.modeling.peft``) wrappers: what names the forward's arguments and holds the head."""
    for name in ("module", "_orig_mod"):
        inner = getattr(model, name, None)
        if isinstance(inner, torch.nn.Module):
            return unwrapped(inner)
    inner = peft_base(model)
    return model if inner is None else unwrapped(inner)


def output_head_problem(model: torch.nn.Module) -> str | None:
    """Why ``hidden @ head.weight.T`` might not be ``model``'s logits; None when it is.

    The head must be a bias-free ``torch.nn.Linear`` returned by ``get_output_embeddings()``, and
    no known config field may transform the logits after it (``LOGIT_TRANSFORMS``).
    """
    model = unwrapped(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    name = type(model).__name__
    if not isinstance(head, torch.nn.Linear):
        return f"{name}.get_output_embeddings() is {type(head).__name__}, not a torch.nn.Linear"
    if head.bias is not None:
        return f"{name}'s output head has a bias"
    config = getattr(model, "config", None)
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    for section in configs:
        for key, identity in LOGIT_TRANSFORMS.items():
            value = getattr(section, key, None)
            if value is not None and value != identity:
                return f"{name} has config.{key}={value!r}, which changes the logits after the head"
    return None


def completion_hidden_states(
    model: torch.nn.Module, inputs: ViewInputs, vocab_size: int | None = None
) -> ViewHead:
    """What the output head receives at each completion position, without ``[B, T, V]`` logits.

    The forward runs through ``model`` itself, so a DDP wrapper still registers the backward and
    syncs gradients. A pre-hook on the head (``get_output_embeddings()``, which
    ``output_head_problem`` must accept) keeps its input and lets it project the last position
    only: that ``[B, 1, V]`` output checks that the projection reproduces the model's logits.

    Args:
        vocab_size: as in ``completion_logits``: keep the head's first ``vocab_size`` rows.

    Returns:
        ``ViewHead`` with ``hidden`` ``[B, T, H]``: position ``t`` holds the state at sequence
        position ``P - 1 + t``, whose logits score completion token ``t`` (as in
        ``completion_logits``), and ``weight`` ``[V, H]``, ``V = vocab_size or V_model``: a view
        of the parameter, so the student's gradient reaches its first ``V`` rows.
    """
    head = unwrapped(model).get_output_embeddings()
    captured = []

    def keep_input(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]  # [B, L, H]
        captured.append(ViewHead(hidden, module.weight, _head_dtype(hidden, module.weight)))
        return (hidden[:, -1:], *args[1:])  # [B, 1, H]

    length = inputs.completion_length
    handle = head.register_forward_pre_hook(keep_input)
    try:
        outputs = model(
            **inputs.forward_inputs(),
            use_cache=False,
            **_logits_to_keep(model, length + 1),
        )
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0].hidden.dim() != 3:
        raise DOPDError(
            f"{type(unwrapped(model)).__name__}'s output head ran {len(captured)} times in one "
            "forward (expected once, on [B, L, H] hidden states); score it with the reference "
            "loss path (path='reference')"
        )
    _check_projection(type(unwrapped(model)).__name__, outputs.logits[:, -1:], captured[0])
    hidden = captured[0].hidden[:, -(length + 1) : -1]  # [B, T, H]
    # Cut after the check above, which compares the model's whole last-position logits.
    weight = captured[0].weight  # [V_model, H]
    keep = vocabulary_slice(weight.shape[0], vocab_size)
    return ViewHead(
        hidden, weight if keep is None else weight[keep], captured[0].dtype
    )  # weight [V, H]


def _head_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


@torch.no_grad()
def _check_projection(name: str, logits: Tensor, head: ViewHead) -> None:
    """Raise unless the model's logits ``[B, 1, V]`` at the last position equal the projection
    of its hidden states: the guard against a logit transform ``output_head_problem`` missed."""
    hidden, weight = ViewHead(head.hidden[:, -1:], head.weight, head.dtype).projection()
    expected = (hidden @ weight.T).float()  # [B, 1, V]
    if expected.numel() == 0:
        return
    # One device sync for both numbers.
    error, largest = torch.stack(
        [(logits.float() - expected).abs().max(), expected.abs().max()]
    ).tolist()
    # Rounding of another matmul kernel, relative to the largest logit; a rescaled or soft-capped
    # head is off by far more. NaN passes: a non-finite forward must reach the loss, where the
    # trainer skips the step and diagnoses it.
    tolerance = max(4 * torch.finfo(head.dtype).eps, 1e-3) * max(largest, 1.0)
    if error > tolerance:
        raise DOPDError(
            f"{name}'s {head.dtype} logits differ from hidden @ head.weight.T by {error:.3g} "
            f"(tolerance {tolerance:.3g}): it transforms its logits after the output head; "
            "score it with the reference loss path (path='reference')"
        )
