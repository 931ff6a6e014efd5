"""One optimizer step of on-policy distillation, exact under micro-batching and data parallelism.

Order of work (docs/method.md §2 and §5):
1. score the constant views (privileged student, teacher, reference) of every micro-batch under
   no grad, and collect the objective's per-token statistics;
2. merge statistics across micro-batches and ranks, fix the step's thresholds and the step's
   reduction denominator *before any loss*;
3. forward+backward each micro-batch with those thresholds and that denominator, so that the
   summed gradient equals the full batch's whatever the split.

Two loss paths give the same results (tests/test_step.py):

* ``chunked`` (the default where it applies): scoring keeps each constant view's final hidden
  states at the valid completion tokens (``[N, H]``, H << V) and its output-head weight; the
  statistics and the loss project them ``chunk_rows`` rows at a time
  (``dopd.objectives.chunked``), so no ``[b, T, V]`` logits exist and a full-vocabulary term
  costs only its own rows;
* ``reference``: ``[b, T, V]`` logits of every view and ``objective_loss``. ``auto`` falls back
  to it when a model's logits are not its hidden states times its head weight (no exposed
  ``torch.nn.Linear`` head, a head bias, logit soft-capping or scaling) or the engine splits the
  head's weight even inside a forward (DeepSpeed, Megatron-LM, FSDP1). Under FSDP2 the chunked
  path captures the gathered head weight during the forward and is exact (tests/test_shards.py).

Both paths score the common vocabulary ``vocab_size``
(``dopd.modeling.loading.common_vocabulary``): a padded head's logits, or its weight's rows, are
cut to the first ``vocab_size`` ids.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor

from dopd.config import LOSS_PATHS
from dopd.errors import DOPDError, require_choice, require_int
from dopd.modeling.alignment import (
    ViewInputs,
    build_view_inputs,
    check_aligned,
    completion_hidden_states,
    completion_logits,
    output_head_problem,
)
from dopd.modeling.vlm_views import RowImages, with_images
from dopd.objectives.base import Objective, ObjectiveThresholds, objective_loss
from dopd.objectives.chunked import (
    DEFAULT_CHUNK_ROWS,
    chunked_objective_loss,
    chunked_statistics,
)
from dopd.objectives.reduction import loss_denominator, row_weights
from dopd.objectives.statistics import merge_statistics
from dopd.objectives.views import (
    CONSTANT_VIEWS,
    TokenViews,
    ViewHead,
    ViewName,
    compute_dtype,
    entropy_and_sampled_logp,
)
from dopd.training.distributed import gather_rows, head_split_reason, sum_across
from dopd.training.step_metrics import BatchLoss, StepTotals


@dataclass
class MicroBatch:
    """Rollout rows of one forward/backward pass and the inputs of each view.

    Attributes:
        completion_ids: ``[b, T]`` long; completion_mask: ``[b, T]`` bool.
        inputs: view name -> ``ViewInputs`` (``[b, P_view + T]``), one per view the step scores.
        token_classes: ``[b, T]`` long, each completion token's true class as an index into the
            objective's ``token_class_names`` (-1 at padding), for objectives that route on it
            (``dopd.training.rollout.completion_token_classes``); None otherwise.
        rollout_log_probs: ``[b, T]`` float, the rollout engine's log-prob of each sampled token
            (``Rollouts.sampled_log_probs``), or None. Given, the step reports the mismatch
            between engine and trainer (``mismatch/*``) and the objective may correct for it.
    """

    completion_ids: Tensor
    completion_mask: Tensor
    inputs: dict[str, ViewInputs]
    token_classes: Tensor | None = None
    rollout_log_probs: Tensor | None = None


def make_micro_batches(
    completion_ids: Tensor,
    completion_mask: Tensor,
    view_prompts: dict[str, list[list[int]]],
    micro_batch_size: int,
    pad_token_id: int,
    *,
    token_classes: Tensor | None = None,
    rollout_log_probs: Tensor | None = None,
    images: RowImages | None = None,
    image_token_id: int | None = None,
) -> list[MicroBatch]:
    """Split rollout rows into micro-batches and lay out ``[prompt | completion]`` per view.

    Args:
        completion_ids, completion_mask: ``[B, T]`` rollouts of this rank.
        view_prompts: view name -> ``B`` prompt-id lists (row-aligned with the completions).
        token_classes: ``[B, T]`` long true token classes (``MicroBatch.token_classes``), or None.
        rollout_log_probs: ``[B, T]`` engine log-probs (``MicroBatch.rollout_log_probs``), or None.
        images: a vision-language run's ``B`` image rows (the same images in every view), with
            ``image_token_id`` the id of an image token: each micro-batch's views then carry its
            rows' ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids``
            (``dopd.modeling.vlm_views.with_images``).
    """
    if images is not None and (image_token_id is None or len(images) != completion_ids.shape[0]):
        raise DOPDError(
            f"images of {len(images)} rows for {completion_ids.shape[0]} completions "
            f"(image_token_id={image_token_id}); pass one image row per completion and the id"
        )
    batches = []
    for start in range(0, completion_ids.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        ids, mask = completion_ids[rows], completion_mask[rows]
        inputs = {
            name: build_view_inputs(prompts[rows], ids, mask, pad_token_id)
            for name, prompts in view_prompts.items()
        }
        if images is not None:
            rows_images = images.select(rows)
            inputs = {
                name: with_images(view, rows_images, image_token_id)
                for name, view in inputs.items()
            }
        check_aligned(*(view.completion_mask for view in inputs.values()))
        classes = None if token_classes is None else token_classes[rows]
        engine = None if rollout_log_probs is None else rollout_log_probs[rows]
        batches.append(MicroBatch(ids, mask, inputs, classes, engine))
    return batches


@torch.no_grad()
def score_constant_views(
    models: dict[str, torch.nn.Module], batch: MicroBatch, vocab_size: int | None = None
) -> dict[str, Tensor]:
    """No-grad completion logits ``[b, T, V]`` of every constant view that has a model, cut to
    ``vocab_size`` columns when given (``completion_logits``)."""
    return {
        name: completion_logits(models[name], batch.inputs[name], vocab_size)
        for name in CONSTANT_VIEWS
        if name in models
    }


@dataclass
class TokenRecord:
    """Per-token results of this rank's first micro-batch, as the loss pass routed them (on CPU,
    detached), for rollout samples (``run_step(record_tokens=True)``).

    Attributes:
        completion_ids: ``[b, T]`` long; completion_mask: ``[b, T]`` bool.
        groups: ``[N]`` long, each valid token's group (an index into ``group_names``).
        statistics: name -> ``[N]`` float, the objective's per-token statistics (none for an
            objective without any).
        student_log_probs: ``[N]`` float, the student's log-prob of each sampled token (plain
            prompt, logits before the loss temperature).
    """

    completion_ids: Tensor
    completion_mask: Tensor
    groups: Tensor
    statistics: dict[str, Tensor]
    student_log_probs: Tensor


@dataclass
class StepOutput:
    """Reduced results of one step (identical on every rank).

    Attributes:
        loss: 0-d float; metrics: name -> float; path: the loss path taken (``chunked`` or
            ``reference``); tokens: this rank's ``TokenRecord`` when asked for, else None.
    """

    loss: Tensor
    metrics: dict[str, float]
    path: str = "reference"
    tokens: TokenRecord | None = None


def choose_path(
    accelerator: Accelerator,
    student: torch.nn.Module,
    models: dict[str, torch.nn.Module],
    path: str = "auto",
) -> str:
    """``"chunked"`` or ``"reference"``: the loss path a step takes for ``path``.

    ``auto`` takes the chunked path when it computes exactly what the reference does, else the
    reference path; ``chunked`` raises ``DOPDError`` saying why it cannot run.
    """
    require_choice("path", path, LOSS_PATHS)
    if path == "reference":
        return path
    problem = _chunked_problem(accelerator, student, models)
    if problem is None:
        return "chunked"
    if path == "chunked":
        raise DOPDError(
            f"path='chunked' cannot run: {problem}; "
            "use path='reference' or 'auto' (which falls back)"
        )
    return "reference"


def _chunked_problem(
    accelerator: Accelerator, student: torch.nn.Module, models: dict[str, torch.nn.Module]
) -> str | None:
    if (reason := head_split_reason(accelerator)) is not None:
        return reason
    for name, model in {"student": accelerator.unwrap_model(student), **models}.items():
        if (problem := output_head_problem(model)) is not None:
            return f"the {name} model: {problem}"
    return None


def run_step(
    accelerator: Accelerator,
    objective: Objective,
    student: torch.nn.Module,
    models: dict[str, torch.nn.Module],
    batches: list[MicroBatch],
    *,
    path: str = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    vocab_size: int | None = None,
    record_tokens: bool = False,
) -> StepOutput:
    """Accumulate the gradient of one optimizer step into ``student`` (no optimizer call).

    Args:
        student: the prepared (possibly DDP-wrapped) trainable model.
        models: constant-view models by name (``priv_student``, ``teacher``, ``reference``).
        batches: this rank's micro-batches.
        path: ``auto`` (chunked where exact, else reference), ``chunked`` or ``reference``.
        chunk_rows: token rows projected through an output head at a time on the chunked path;
            its extra memory grows as ``chunk_rows x V``.
        vocab_size: the common vocabulary of the heads
            (``dopd.modeling.loading.common_vocabulary``): every view is scored over ids
            ``0 .. vocab_size - 1``. None (or every head's size) scores
            each head whole, which then requires equal sizes.
        record_tokens: also return the first micro-batch's per-token groups and statistics
            (``StepOutput.tokens``), taken from the loss pass: no extra forward.
    """
    require_int("chunk_rows", chunk_rows, low=1)
    chosen = choose_path(accelerator, student, models, path)
    loss_path = (_ChunkedPath if chosen == "chunked" else _ReferencePath)(
        objective, student, models, chunk_rows, vocab_size
    )
    start = time.perf_counter()
    scores = [loss_path.score(batch) for batch in batches]
    statistics = (
        [loss_path.statistics(batch, score) for batch, score in zip(batches, scores)]
        if objective.statistics_views
        else []
    )
    scored = time.perf_counter()
    merged = (
        {
            key: gather_rows(accelerator, value)
            for key, value in merge_statistics(statistics).items()
        }
        if statistics
        else {}
    )
    thresholds = objective.thresholds(merged)
    reduction = objective.config.reduction
    denominator = sum_across(
        accelerator, sum(loss_denominator(b.completion_mask, reduction) for b in batches)
    )

    totals, tokens = StepTotals(len(objective.group_names), accelerator.device), None
    for index, (batch, score) in enumerate(zip(batches, scores)):
        sync = index == len(batches) - 1
        with nullcontext() if sync else accelerator.no_sync(student):
            out = loss_path.loss(batch, score, thresholds, denominator)
            # Data parallelism averages gradients over ranks; each rank's loss already divides by
            # the global denominator, so scale back up to get the sum.
            accelerator.backward(out.loss * accelerator.num_processes)
        totals.add(out)
        if record_tokens and index == 0:
            tokens = _token_record(batch, out)
    metrics = totals.reduce(accelerator, objective)
    metrics.update(
        {"time/scoring": scored - start, "time/forward_backward": time.perf_counter() - scored}
    )
    metrics.update(
        {k: float(v) for k, v in objective.metrics(merged, thresholds).items()} if merged else {}
    )
    return StepOutput(torch.tensor(metrics["loss"]), metrics, chosen, tokens)


def _token_record(batch: MicroBatch, out: BatchLoss) -> TokenRecord:
    def host(value: Tensor) -> Tensor:
        return value.detach().to("cpu", copy=True)

    return TokenRecord(
        host(batch.completion_ids),
        host(batch.completion_mask.bool()),
        host(out.groups),
        {name: host(value).float() for name, value in out.statistics.items()},
        host(out.student_log_probs).float(),
    )


class _LossPath:
    """What both loss paths keep: the objective, the student, the constant-view models, the
    chunk rows and the common vocabulary."""

    def __init__(
        self,
        objective: Objective,
        student: torch.nn.Module,
        models: dict[str, torch.nn.Module],
        chunk_rows: int,
        vocab_size: int | None,
    ):
        self.objective, self.student, self.models = objective, student, models
        self.chunk_rows, self.vocab_size = chunk_rows, vocab_size


class _ReferencePath(_LossPath):
    """Every view as ``[b, T, V]`` logits, the loss by ``objective_loss``."""

    def score(self, batch: MicroBatch) -> dict[str, Tensor]:
        return score_constant_views(self.models, batch, self.vocab_size)

    def statistics(self, batch: MicroBatch, logits: dict[str, Tensor]) -> dict[str, Tensor]:
        views = {
            name: logits[name] for name in self.objective.statistics_views if name != "student"
        }
        if "student" in self.objective.statistics_views:
            with torch.no_grad():
                views["student"] = completion_logits(
                    self.student, batch.inputs["student"], self.vocab_size
                )
        token_views = TokenViews.from_batch(
            views,
            batch.completion_ids,
            batch.completion_mask.bool(),
            self.objective.config.temperature,
        )
        return self.objective.statistics(token_views)

    def loss(
        self,
        batch: MicroBatch,
        logits: dict[str, Tensor],
        thresholds: ObjectiveThresholds,
        denominator: Tensor,
    ) -> BatchLoss:
        student_logits = completion_logits(
            self.student, batch.inputs["student"], self.vocab_size
        )  # [b, T, V]
        out = objective_loss(
            self.objective,
            student_logits,
            logits.get("priv_student"),
            logits.get("teacher"),
            batch.completion_ids,
            batch.completion_mask,
            reference_logits=logits.get("reference"),
            thresholds=thresholds,
            denominator=denominator,
            token_classes=batch.token_classes,
            rollout_log_probs=batch.rollout_log_probs,
        )
        mask = batch.completion_mask.bool()
        entropy, log_probs = entropy_and_sampled_logp(
            student_logits[mask], batch.completion_ids[mask]
        )
        engine = None if batch.rollout_log_probs is None else batch.rollout_log_probs[mask]
        statistics = {name: value[mask] for name, value in out.statistics.items()}
        return BatchLoss(
            out.loss,
            out.groups[mask],
            out.per_token_loss[mask],
            entropy,
            log_probs,
            engine,
            statistics,
        )


class _ChunkedPath(_LossPath):
    """Every view as final hidden states ``[N, H]`` at the valid tokens plus its head weight; the
    statistics and the loss project them ``chunk_rows`` rows at a time."""

    @torch.no_grad()
    def score(self, batch: MicroBatch) -> dict[ViewName, ViewHead]:
        mask = batch.completion_mask.bool()
        return {
            name: completion_hidden_states(
                self.models[name], batch.inputs[name], self.vocab_size
            ).select(mask)  # [N, H]
            for name in CONSTANT_VIEWS
            if name in self.models
        }

    def statistics(self, batch: MicroBatch, heads: dict[ViewName, ViewHead]) -> dict[str, Tensor]:
        mask = batch.completion_mask.bool()
        if "student" in self.objective.statistics_views:
            with torch.no_grad():
                heads = {
                    **heads,
                    "student": completion_hidden_states(
                        self.student, batch.inputs["student"], self.vocab_size
                    ).select(mask),
                }
        return chunked_statistics(
            self.objective, heads, batch.completion_ids[mask], chunk_rows=self.chunk_rows
        )

    def loss(
        self,
        batch: MicroBatch,
        heads: dict[ViewName, ViewHead],
        thresholds: ObjectiveThresholds,
        denominator: Tensor,
    ) -> BatchLoss:
        mask = batch.completion_mask.bool()
        # Through the (possibly DDP-wrapped) student, so that its backward syncs gradients.
        student = completion_hidden_states(
            self.student, batch.inputs["student"], self.vocab_size
        ).select(mask)  # [N, H]
        weights = row_weights(
            mask, self.objective.config.reduction, denominator, dtype=compute_dtype(student.dtype)
        )  # [N]
        engine = None if batch.rollout_log_probs is None else batch.rollout_log_probs[mask]
        out = chunked_objective_loss(
            self.objective,
            {**heads, "student": student},
            batch.completion_ids[mask],
            weights,
            thresholds=thresholds,
            chunk_rows=self.chunk_rows,
            student_metrics=True,
            token_classes=None if batch.token_classes is None else batch.token_classes[mask],
            rollout_log_probs=engine,
        )
        return BatchLoss(
            out.loss,
            out.groups,
            out.per_token_loss,
            out.student_entropy,
            out.student_log_probs,
            engine,
            out.statistics,
        )
