"""The valid completion positions of every model view, flattened to rows.

Objectives never see padding: ``TokenViews`` keeps, for each view, only the rows of the logits at
valid completion positions (``N`` rows of a ``[B, T]`` batch), already divided by the loss
temperature and cast to the compute dtype. Only the student view carries gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

VIEW_NAMES = ("student", "priv_student", "teacher", "reference")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (bf16/fp16 inputs are upcast); float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


class TokenViews:
    """Per-view logits at the valid positions.

    Attributes:
        logits: view name -> ``[N, V]`` float logits / temperature (only ``"student"`` has grad).
        token_ids: ``[N]`` long, the sampled completion tokens.
    """

    def __init__(self, logits: dict[str, Tensor], token_ids: Tensor):
        self.logits = logits
        self.token_ids = token_ids

    @classmethod
    def from_batch(
        cls,
        logits: dict[str, Tensor | None],
        completion_ids: Tensor,
        mask: Tensor,
        temperature: float,
    ) -> TokenViews:
        """Select valid rows from ``[B, T, V]`` logits (``None`` views are skipped).

        Args:
            logits: view name -> ``[B, T, V]`` logits of any float dtype, or None.
            completion_ids: ``[B, T]`` long.
            mask: ``[B, T]`` bool.
            temperature: the loss temperature; logits are divided by it.
        """
        rows = {}
        for name, value in logits.items():
            if value is None:
                continue
            value = value if name == "student" else value.detach()
            rows[name] = value[mask].to(compute_dtype(value.dtype)) / temperature  # [N, V]
        return cls(rows, completion_ids[mask])

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    def sampled_logp(self, view: str, rows: Tensor | None = None) -> Tensor:
        """``[M]`` log-prob of the sampled token under ``view`` (all rows, or ``rows`` ``[M]``)."""
        logits = self.logits[view] if rows is None else self.logits[view][rows]
        ids = self.token_ids if rows is None else self.token_ids[rows]
        return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    def entropy(self, view: str) -> Tensor:
        """``[N]`` entropy (nats) of ``view`` at every row, detached."""
        logp = self.logits[view].detach().log_softmax(-1)
        return -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)
