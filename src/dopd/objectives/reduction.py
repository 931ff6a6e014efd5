"""Reduction of per-token losses to one scalar, exact under micro-batching and data parallelism.

A loss of one optimizer step is ``sum(contributions) / denominator``. Each micro-batch adds its
own contributions but divides by the *step's* denominator, so summing micro-batch losses gives the
full-batch loss exactly, however the batch is split.

* ``"sequence_mean"`` (paper): contribution of sequence b = mean of its per-token losses; the
  denominator counts sequences with at least one valid token.
* ``"token_mean"``: contribution = each valid token's loss; the denominator counts valid tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("sequence_mean", "token_mean")


def loss_denominator(mask: Tensor, reduction: str) -> Tensor:
    """The denominator ``mask`` contributes: a 0-d long tensor.

    Args:
        mask: ``[B, T]`` bool, valid completion tokens.
        reduction: ``"sequence_mean"`` or ``"token_mean"``.
    """
    if reduction == "token_mean":
        return mask.sum()
    return mask.any(-1).sum()


def reduce_loss(per_token: Tensor, mask: Tensor, reduction: str, denominator: Tensor | float | None = None) -> Tensor:
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
