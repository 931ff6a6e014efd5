"""Reduction of per-token losses to one scalar, exact under micro-batching and data parallelism.

A loss of one optimizer step is ``sum(contributions) / denominator``. Each micro-batch adds its
own contributions but divides by the *step's* denominator, so summing micro-batch losses gives the
full-batch loss exactly, however the batch is split.

* ``"sequence_mean"`` (paper): contribution of sequence b = mean of its per-token losses; the
  denominator counts sequences with at least one valid token.
* ``"token_mean"``: contribution = each valid token's loss; the denominator counts valid tokens.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Reduction = Literal["sequence_mean", "token_mean"]
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)


def loss_denominator(mask: Tensor, reduction: str) -> Tensor:
    """The denominator ``mask`` contributes: a 0-d long tensor.

    Args:
        mask: ``[B, T]`` bool, valid completion tokens.
        reduction: ``"sequence_mean"`` or ``"token_mean"``.
    """
    if reduction == "token_mean":
        return mask.sum()
    return mask.any(-1).sum()


def reduce_loss(
    per_token: Tensor, mask: Tensor, reduction: str, denominator: Tensor | float | None = None
) -> Tensor:
    """Sum of contributions divided by ``denominator`` (default: this batch's own).

    Args:
        per_token: ``[B, T]`` float per-token losses (invalid positions are ignored).
        mask: ``[B, T]`` bool.
        reduction: ``"sequence_mean"`` or ``"token_mean"``.
        denominator: the step-level count from ``loss_denominator`` summed over micro-batches and
            ranks; ``None`` uses this batch's. A zero denominator gives a zero loss.

    Returns:
        0-d float tensor.
    """
    per_token = per_token * mask  # padding never contributes, whatever the caller left there
    if reduction == "token_mean":
        total = per_token.sum()
    else:
        total = (per_token.sum(-1) / mask.sum(-1).clamp_min(1)).sum()
    if denominator is None:
        denominator = loss_denominator(mask, reduction)
    return total / torch.as_tensor(denominator, dtype=total.dtype).clamp_min(1)


def row_weights(
    mask: Tensor,
    reduction: str,
    denominator: Tensor | float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """What each valid token's loss is multiplied by in the reduced loss.

    ``(row_weights(mask, r, d) * per_token[mask]).sum()`` equals
    ``reduce_loss(per_token, mask, r, d)`` (up to rounding), so a path that never builds
    ``[B, T]`` losses (the chunked path) reduces exactly as the reference does, with the same
    step-level denominator.

    Args:
        mask: ``[B, T]`` bool; rows are the valid tokens in row-major order (``x[mask]``).
        reduction: ``"sequence_mean"`` or ``"token_mean"``.
        denominator: as in ``reduce_loss``; ``None`` uses this batch's.
        dtype: float dtype of the weights.

    Returns:
        ``[N]`` float weights, ``N = mask.sum()``.
    """
    mask = mask.bool()
    if denominator is None:
        denominator = loss_denominator(mask, reduction)
    denominator = torch.as_tensor(denominator, dtype=dtype, device=mask.device).clamp_min(1)
    if reduction == "token_mean":
        per_sequence = torch.ones(mask.shape[0], dtype=dtype, device=mask.device)  # [B]
    else:
        per_sequence = 1.0 / mask.sum(-1).clamp_min(1).to(dtype)  # [B]
    return (per_sequence / denominator).unsqueeze(-1).expand(mask.shape)[mask]  # [N]
