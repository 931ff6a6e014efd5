"""The model views of one completion, named once, in the two forms the objectives read.

A *view* is one model scoring the completion after one prompt (docs/method.md §1): the student on
the plain prompt (the only view with gradient), the privileged student (the student on the hinted
prompt), the teacher on the hinted prompt, and an optional reference model.

* ``ViewHead``: a view's final hidden states and the output head that projects them, the form the
  chunked loss takes (no ``[N, V]`` logits until a chunk needs them);
* ``TokenViews``: every view's logits at the valid completion positions (``N`` rows of a
  ``[B, T]`` batch, never padding), already divided by the loss temperature and cast to the
  compute dtype, the form every objective's per-token maths reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

ViewName = Literal["student", "priv_student", "teacher", "reference"]
VIEW_NAMES: tuple[ViewName, ...] = get_args(ViewName)
# The views scored without gradient, once per step before any loss (docs/method.md §5).
CONSTANT_VIEWS: tuple[ViewName, ...] = ("priv_student", "teacher", "reference")


@dataclass(frozen=True)
class ViewHead:
    """One view's final hidden states and the output head that scores them.

    ``hidden.to(dtype) @ weight.to(dtype).T`` are the view's logits (their first ``V`` columns when
    the weight is cut to the run's common vocabulary).

    Attributes:
        hidden: ``[B, T, H]`` (``[N, H]`` after ``select``) float; position ``t`` scores
            completion token ``t``. Carries the forward's graph when the forward ran with grad.
        weight: ``[V, H]`` the output head's weight: the parameter itself (perhaps tied to the
            embedding), or its first ``V`` rows.
        dtype: the dtype the head computes in: the autocast dtype under mixed precision, else the
            weight's; None promotes ``hidden`` and ``weight``.
    """

    hidden: Tensor
    weight: Tensor
    dtype: torch.dtype | None = None

    @property
    def head_dtype(self) -> torch.dtype:
        """``dtype``, or the promotion of the hidden states' and the weight's dtypes."""
        return self.dtype or torch.promote_types(self.hidden.dtype, self.weight.dtype)

    def select(self, mask: Tensor) -> ViewHead:
        """The rows at ``mask`` (``[B, T]`` bool): ``hidden`` becomes ``[N, H]``."""
        return ViewHead(self.hidden[mask], self.weight, self.dtype)

    def projection(self) -> tuple[Tensor, Tensor]:
        """``hidden`` and ``weight`` cast (differentiably) to ``head_dtype``: their product is
        what the model's head computes, e.g. a bf16 matmul under bf16 autocast."""
        dtype = self.head_dtype
        return self.hidden.to(dtype), self.weight.to(dtype)

    def logits(self, rows: slice) -> Tensor:
        """``[C, V]`` logits of ``rows`` of ``[N, H]`` hidden states, as the model's head computes
        them."""
        dtype = self.head_dtype
        return self.hidden[rows].to(dtype) @ self.weight.to(dtype).T


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (bf16/fp16 inputs are upcast); float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def logits_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of ``softmax(logits)``: ``[..., V]`` any float dtype -> ``[...]`` float32 or
    wider, detached."""
    return _entropy(logits.detach().to(compute_dtype(logits.dtype)).log_softmax(-1))


def entropy_and_sampled_logp(logits: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
    """``logits_entropy(logits)`` and the log-prob of ``token_ids`` ``[...]`` under
    ``softmax(logits)`` ``[..., V]``, from one log-softmax; both ``[...]``, detached."""
    logp = logits.detach().to(compute_dtype(logits.dtype)).log_softmax(-1)
    return _entropy(logp), logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def _entropy(logp: Tensor) -> Tensor:
    # 0 * log 0 is 0: clamp -inf log-probs (masked tokens) so that they do not give 0 * -inf = nan.
    return -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)


class TokenViews:
    """Per-view logits at the valid positions.

    Attributes:
        logits: view name -> ``[N, V]`` float logits / temperature (only ``"student"`` has grad).
        token_ids: ``[N]`` long, the sampled completion tokens.
        token_classes: ``[N]`` long, each token's true class as an index into the objective's
            ``token_class_names``, for objectives that route on it (``uses_token_classes``);
            None otherwise.
        rollout_log_probs: ``[N]`` float, the rollout engine's log-prob of each sampled token
            (for ``importance_correction``), or None.
    """

    def __init__(
        self,
        logits: dict[str, Tensor],
        token_ids: Tensor,
        token_classes: Tensor | None = None,
        rollout_log_probs: Tensor | None = None,
    ):
        self.logits = logits
        self.token_ids = token_ids
        self.token_classes = token_classes
        self.rollout_log_probs = rollout_log_probs

    @classmethod
    def from_batch(
        cls,
        logits: dict[str, Tensor | None],
        completion_ids: Tensor,
        mask: Tensor,
        temperature: float,
        token_classes: Tensor | None = None,
        rollout_log_probs: Tensor | None = None,
    ) -> TokenViews:
        """Select valid rows from ``[B, T, V]`` logits (``None`` views are skipped).

        Args:
            logits: view name -> ``[B, T, V]`` logits of any float dtype, or None.
            completion_ids: ``[B, T]`` long.
            mask: ``[B, T]`` bool.
            temperature: the loss temperature; logits are divided by it.
            token_classes: ``[B, T]`` long class indices (padding: -1, never selected), or None.
            rollout_log_probs: ``[B, T]`` float engine log-probs, or None.
        """
        # [N, V] each
        rows = {name: value[mask] for name, value in logits.items() if value is not None}
        classes = None if token_classes is None else token_classes[mask]  # [N]
        engine = None if rollout_log_probs is None else rollout_log_probs[mask]  # [N]
        return cls.from_rows(rows, completion_ids[mask], temperature, classes, engine)

    @classmethod
    def from_rows(
        cls,
        logits: dict[str, Tensor],
        token_ids: Tensor,
        temperature: float,
        token_classes: Tensor | None = None,
        rollout_log_probs: Tensor | None = None,
    ) -> TokenViews:
        """Views from logits that are already rows of valid tokens (a whole batch or one chunk).

        Args:
            logits: view name -> ``[N, V]`` logits of any float dtype.
            token_ids: ``[N]`` long.
            temperature: the loss temperature; logits are divided by it.
            token_classes: ``[N]`` long class indices of the same rows, or None.
            rollout_log_probs: ``[N]`` float engine log-probs of the same rows, or None.
        """
        rows = {}
        for name, value in logits.items():
            value = value if name == "student" else value.detach()
            # Upcast before dividing: softmax of bf16 logits loses the small probabilities.
            value = value.to(compute_dtype(value.dtype))  # [N, V]
            # x / 1 is x exactly; skipping it saves one [N, V] copy per view.
            rows[name] = value if temperature == 1.0 else value / temperature
        return cls(rows, token_ids, token_classes, rollout_log_probs)

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
        return logits_entropy(self.logits[view])


def check_token_classes(
    token_classes: Tensor | None, valid: Tensor, num_classes: int, needed: bool, who: str
) -> None:
    """Refuse token classes that an objective routing on them cannot read, naming what is wrong
    (nothing is checked for an objective that does not read them).

    Args:
        token_classes: ``[B, T]`` or ``[N]`` long class indices, or None.
        valid: bool of the same shape, the positions that reach the loss (their class must lie in
            ``0 .. num_classes - 1``; others, e.g. padding at -1, are not read).
        num_classes: the number of classes the objective names (``token_class_names``).
        needed: whether the objective routes on token classes (``uses_token_classes``).
        who: the objective, for messages.
    """
    if not needed:
        return  # the objective does not read them
    if token_classes is None:
        raise ValueError(
            f"objective {who} routes on the tokens' true classes; pass token_classes "
            "(long class indices into its token_class_names, -1 at padding)"
        )
    if token_classes.shape != valid.shape or token_classes.dtype != torch.long:
        raise ValueError(
            f"token_classes must be long of shape {tuple(valid.shape)} like the completion "
            f"tokens; got {token_classes.dtype} of shape {tuple(token_classes.shape)}"
        )
    read = token_classes[valid.bool()]
    if read.numel() and not ((read >= 0) & (read < num_classes)).all():
        raise ValueError(
            f"token_classes of valid tokens must lie in 0 .. {num_classes - 1} (the objective's "
            f"token_class_names); got values in {int(read.min())} .. {int(read.max())}"
        )
