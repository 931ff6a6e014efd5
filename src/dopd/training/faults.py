"""Diagnosing a non-finite step: which view's logits, or else which objective, produced it.

Only run after the trainer has skipped a step (the hot path never pays for it): it re-scores the
step's micro-batches view by view and reports the first non-finite completion logit it finds.
"""

from __future__ import annotations

import torch

from dopd.modeling.alignment import completion_logits
from dopd.objectives.views import VIEW_NAMES
from dopd.training.step import MicroBatch


@torch.no_grad()
def locate_nonfinite(
    student: torch.nn.Module,
    models: dict[str, torch.nn.Module],
    batches: list[MicroBatch],
    objective_name: str,
    *,
    vocab_size: int | None = None,
) -> str:
    """One line naming where a step's non-finite loss or gradient came from.

    Args:
        student: the unwrapped trainable model.
        models: constant-view models by name (``priv_student``, ``teacher``, ``reference``).
        batches: the step's micro-batches (this rank's).
        objective_name: the registry name of the objective, named when every view is finite.
        vocab_size: the common vocabulary the step scored (``run_step``); padded columns past it
            never reached the loss, so they are not inspected.
    """
    for index, batch in enumerate(batches):
        for name in VIEW_NAMES:
            model = student if name == "student" else models.get(name)
            if model is None or name not in batch.inputs:
                continue
            logits = completion_logits(model, batch.inputs[name], vocab_size)  # [b, T, V]
            # -inf is a legitimate zero probability unless the whole row is -inf; padding
            # positions never reach the loss, so only valid completion tokens count.
            broken = (
                logits.isnan().any(-1) | logits.isposinf().any(-1) | logits.isneginf().all(-1)
            )  # [b, T]
            bad = broken & batch.completion_mask.bool()
            if bad.any():
                row, position = bad.nonzero()[0].tolist()
                return (
                    f"the {name} view's logits are non-finite on {int(bad.sum())} "
                    "completion tokens "
                    f"(first: micro-batch {index}, row {row}, completion position {position})"
                )
    return (
        f"every view's logits are finite, so objective {objective_name!r} "
        "produced the non-finite loss or gradient"
    )
