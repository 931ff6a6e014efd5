"""One optimizer step of on-policy distillation, exact under micro-batching and data parallelism.

Order of work (METHOD.md sections 2 and 5):
1. score the constant views (privileged student, teacher, reference) of every micro-batch under
   no grad, and collect the objective's per-token statistics;
2. merge statistics across micro-batches and ranks, fix the step's thresholds and the step's
   reduction denominator *before any loss*;
3. forward+backward each micro-batch with those thresholds and that denominator, so that the
   summed gradient equals the full batch's whatever the split.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor

from dopd.alignment import ViewInputs, build_view_inputs, check_aligned, completion_logits
from dopd.distributed import gather_rows, sum_across
from dopd.objectives.base import Objective, objective_loss
from dopd.objectives.reduction import loss_denominator
from dopd.objectives.statistics import merge_statistics
from dopd.objectives.views import TokenViews

CONSTANT_VIEWS = ("priv_student", "teacher", "reference")


@dataclass
class MicroBatch:
    """Rollout rows of one forward/backward pass and the inputs of each view.

    Attributes:
        completion_ids: ``[b, T]`` long; completion_mask: ``[b, T]`` bool.
        inputs: view name -> ``ViewInputs`` (``[b, P_view + T]``), one per view the step scores.
    """

    completion_ids: Tensor
    completion_mask: Tensor
    inputs: dict[str, ViewInputs]


def make_micro_batches(
    completion_ids: Tensor,
    completion_mask: Tensor,
    view_prompts: dict[str, list[list[int]]],
    micro_batch_size: int,
    pad_token_id: int,
) -> list[MicroBatch]:
    """Split rollout rows into micro-batches and lay out ``[prompt | completion]`` per view.

    Args:
        completion_ids, completion_mask: ``[B, T]`` rollouts of this rank.
        view_prompts: view name -> ``B`` prompt-id lists (row-aligned with the completions).
    """
    batches = []
    for start in range(0, completion_ids.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        ids, mask = completion_ids[rows], completion_mask[rows]
        inputs = {name: build_view_inputs(prompts[rows], ids, mask, pad_token_id) for name, prompts in view_prompts.items()}
        check_aligned(*(view.completion_mask for view in inputs.values()))
        batches.append(MicroBatch(ids, mask, inputs))
    return batches


@torch.no_grad()
def score_constant_views(models: dict[str, torch.nn.Module], batch: MicroBatch) -> dict[str, Tensor]:
    """No-grad completion logits ``[b, T, V]`` of every constant view that has a model."""
    return {name: completion_logits(models[name], batch.inputs[name]) for name in CONSTANT_VIEWS if name in models}


@dataclass
class StepOutput:
    """Reduced results of one step (identical on every rank)."""

    loss: Tensor
    metrics: dict[str, float]


def run_step(
    accelerator: Accelerator,
    objective: Objective,
    student: torch.nn.Module,
    models: dict[str, torch.nn.Module],
    batches: list[MicroBatch],
) -> StepOutput:
    """Accumulate the gradient of one optimizer step into ``student`` (no optimizer call).

    Args:
        student: the prepared (possibly DDP-wrapped) trainable model.
        models: constant-view models by name (``priv_student``, ``teacher``, ``reference``).
        batches: this rank's micro-batches.
    """
    start = time.perf_counter()
    constant_logits = [score_constant_views(models, batch) for batch in batches]
    statistics = [_statistics(objective, student, batch, logits) for batch, logits in zip(batches, constant_logits)]
    scored = time.perf_counter()
    merged = {key: gather_rows(accelerator, value) for key, value in merge_statistics(statistics).items()} if statistics[0] else {}
    thresholds = objective.thresholds(merged)
    reduction = objective.config.reduction
    denominator = sum_across(accelerator, sum(loss_denominator(b.completion_mask, reduction) for b in batches))

    totals = _Totals(len(objective.group_names), accelerator.device)
    for index, (batch, logits) in enumerate(zip(batches, constant_logits)):
        sync = index == len(batches) - 1
        with nullcontext() if sync else accelerator.no_sync(student):
            student_logits = completion_logits(student, batch.inputs["student"])  # [b, T, V]
            out = objective_loss(
                objective, student_logits, logits.get("priv_student"), logits.get("teacher"),
                batch.completion_ids, batch.completion_mask, reference_logits=logits.get("reference"),
                thresholds=thresholds, denominator=denominator,
            )
            # Data parallelism averages gradients over ranks; each rank's loss already divides by
            # the global denominator, so scale back up to get the sum.
            accelerator.backward(out.loss * accelerator.num_processes)
        totals.add(out, student_logits.detach(), batch.completion_mask)
    metrics = totals.reduce(accelerator, objective)
    metrics.update({"time/scoring": scored - start, "time/forward_backward": time.perf_counter() - scored})
    metrics.update({k: float(v) for k, v in objective.metrics(merged, thresholds).items()} if merged else {})
    return StepOutput(torch.tensor(metrics["loss"]), metrics)


def _statistics(objective: Objective, student, batch: MicroBatch, logits: dict[str, Tensor]) -> dict[str, Tensor]:
    if not objective.statistics_views:
        return {}
    views = {name: logits[name] for name in objective.statistics_views if name != "student"}
    if "student" in objective.statistics_views:
        with torch.no_grad():
            views["student"] = completion_logits(student, batch.inputs["student"])
    token_views = TokenViews.from_batch(views, batch.completion_ids, batch.completion_mask.bool(), objective.config.temperature)
    return objective.statistics(token_views)


class _Totals:
    """Sums over micro-batches (then ranks) behind the step's metrics."""

    def __init__(self, num_groups: int, device):
        self.values = torch.zeros(2 * num_groups + 3, dtype=torch.float64, device=device)
        self.num_groups = num_groups

    def add(self, out, student_logits: Tensor, mask: Tensor) -> None:
        g = self.num_groups
        groups = out.groups[mask.bool()]
        per_token = out.per_token_loss[mask.bool()].double()
        self.values[:g] += torch.bincount(groups, minlength=g)[:g].double()
        self.values[g:2 * g] += torch.zeros(g, dtype=torch.float64, device=per_token.device).index_add(0, groups, per_token)
        logp = student_logits.float().log_softmax(-1)
        entropy = -(logp.exp() * logp.clamp_min(-1e4)).sum(-1)[mask.bool()]
        self.values[2 * g] += out.loss.detach().double()
        self.values[2 * g + 1] += entropy.double().sum()
        self.values[2 * g + 2] += mask.sum()

    def reduce(self, accelerator: Accelerator, objective: Objective) -> dict[str, float]:
        values = sum_across(accelerator, self.values).tolist()
        g, tokens = self.num_groups, max(values[2 * self.num_groups + 2], 1.0)
        metrics = {"loss": values[2 * g], "student_entropy": values[2 * g + 1] / tokens, "completion_tokens": values[2 * g + 2]}
        for index, name in enumerate(objective.group_names):
            count = values[index]
            metrics[f"fraction/{name}"] = count / tokens
            metrics[f"loss/{name}"] = values[g + index] / count if count else 0.0
        return metrics
