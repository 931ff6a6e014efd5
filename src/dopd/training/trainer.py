"""The on-policy distillation trainer: rollouts from the current student, three-view scoring,
one exact optimizer step, metrics, evaluation and checkpoints, on accelerate.

The same code runs on 1 CPU, 1 GPU and multi-GPU DDP (FSDP and DeepSpeed are refused: the
checkpoint format saves unsharded state from the main process): launch it with
``accelerate launch [--config_file ...] -m dopd.cli train --config ...``.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from dopd.config import PromptView, TrainConfig, save_config
from dopd.errors import ConfigError, DOPDError
from dopd.io.atomic import replacing, write_text_atomically
from dopd.io.data import load_examples, tokenize_views
from dopd.modeling.loading import check_sources, common_vocabulary, load_model, output_size
from dopd.objectives.views import ViewName
from dopd.training.backends import check_backend, make_backend
from dopd.training.checkpoint import (
    TrainingState,
    load_latest_checkpoint,
    remove_stale_temporaries,
    require_support,
    save_checkpoint,
    save_final_model,
)
from dopd.training.distributed import sum_across
from dopd.training.evaluation import evaluate, load_verifier
from dopd.training.faults import locate_nonfinite
from dopd.training.rollout import completion_token_classes, rollout_seeds
from dopd.training.step import make_micro_batches, run_step


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


class EMA(torch.nn.Module):
    """Exponential moving average of the student's weights, the ``ema`` privileged student."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.model, self.decay = copy.deepcopy(model).requires_grad_(False), decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for average, current in zip(self.model.parameters(), model.parameters()):
            average.lerp_(current.detach().to(average.dtype), 1.0 - self.decay)


class Trainer:
    """Builds everything a run needs from a ``TrainConfig`` and trains it."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        verifier=None,
        token_roles=None,
    ):
        """``verifier`` (``(completion, answer) -> bool``) replaces ``eval.verifier`` when given.
        ``token_roles`` (``tokens -> one class name per token``, e.g. a lab task's) labels each
        rollout's tokens for an objective that routes on true classes (``dopd_oracle_routing``).
        """
        self.config = config
        self.output_dir = Path(config.output_dir)
        # The schedule counts optimizer steps, not per-process batches: step it once per step.
        self.accelerator = Accelerator(
            mixed_precision=config.loop.mixed_precision, step_scheduler_with_optimizer=False
        )
        _check_output_dir(self.accelerator, self.output_dir, resume, overwrite)
        set_seed(config.seed)
        self.spec, self.objective = config.objective.spec, config.objective.build()
        if self.objective.uses_token_classes and token_roles is None:
            raise ConfigError(
                "objective.routing='oracle' needs token classes: pass Trainer(token_roles=...), "
                "one class name per completion token (e.g. a lab task's token_roles)"
            )
        self.token_roles = token_roles
        # Which prompt each view reads: "plain" or "privileged".
        self.prompt_kinds: dict[ViewName, PromptView] = {
            "student": config.views.student_input,
            "priv_student": config.views.priv_student or self.spec.priv_student_view,
            "teacher": config.views.teacher or self.spec.teacher_view,
            "reference": "plain",
        }
        # Sources, data and models are checked and loaded before output_dir is touched, so a bad
        # input never deletes (--overwrite) or half-writes a run.
        self.tokenizer = check_sources(config)
        check_backend(config.rollout)
        self._load_data(verifier)
        self._build_models()
        self.rollout_backend = make_backend(
            config,
            self.tokenizer,
            self.vocab_size,
            self.accelerator.unwrap_model(self.student),
            self.accelerator,
        )
        _prepare_output_dir(self.accelerator, self.output_dir, resume, overwrite)
        self.step, self.skipped_steps, self.consecutive_skips = 0, 0, 0
        self.state = TrainingState(self.student, self.optimizer, self.scheduler, self.ema)
        if resume:
            self.step = load_latest_checkpoint(self.accelerator, self.output_dir, self.state)
        if self.accelerator.is_main_process:
            # Atomic: `--resume --config output_dir/config.yaml` must never meet a torn file.
            with replacing(self.output_dir / "config.yaml") as temp:
                save_config(config, temp)
            _truncate_metrics(self.output_dir / "metrics.jsonl", self.step)

    # -- setup ------------------------------------------------------------------------------
    def _load_data(self, verifier) -> None:
        data = self.config.data
        self.prompts = self._tokenized(load_examples(data.train), "data.train")
        if len(self.prompts["plain"]) == 0:
            raise DOPDError(
                f"data.train={data.train!r}: every prompt is longer than "
                f"data.max_prompt_length={data.max_prompt_length}; "
                "fix: raise data.max_prompt_length or shorten the prompts"
            )
        self.eval_prompts = (
            self._tokenized(load_examples(data.eval), "data.eval") if data.eval else None
        )
        world, per_step = self.accelerator.num_processes, self.config.rollout.prompts_per_step
        if per_step % world:
            raise ConfigError(
                f"rollout.prompts_per_step={per_step} must be divisible by "
                f"the number of processes ({world})"
            )
        self.sampler = PromptSampler(len(self.prompts["plain"]), per_step, self.config.seed)
        # Load the verifier now, so that a bad one fails before any training step.
        self.verifier = verifier or (
            load_verifier(self.config.eval.verifier) if self.eval_prompts else None
        )

    def _tokenized(self, examples, key: str) -> dict[str, list]:
        data, kwargs = self.config.data, self.config.tokenizer.chat_template_kwargs
        plain, privileged = tokenize_views(
            examples, self.tokenizer, data.privileged_template, kwargs
        )
        keep = [
            i
            for i in range(len(examples))
            if max(len(plain[i]), len(privileged[i])) <= data.max_prompt_length
        ]
        skipped = len(examples) - len(keep)
        where = f"{key}={getattr(data, key.split('.')[1])!r}"
        if skipped and data.overlong_prompts == "error":
            raise DOPDError(
                f"{where}: {skipped} of {len(examples)} prompts exceed "
                f"data.max_prompt_length={data.max_prompt_length}; "
                "fix: raise it, or set data.overlong_prompts=skip"
            )
        if skipped:
            self.accelerator.print(
                f"warning: {where}: skipped {skipped} of {len(examples)} prompts longer than "
                f"data.max_prompt_length={data.max_prompt_length}"
            )
        return {
            "plain": [plain[i] for i in keep],
            "privileged": [privileged[i] for i in keep],
            "answer": [examples[i].answer for i in keep],
        }

    def _build_models(self) -> None:
        config, accelerator = self.config, self.accelerator
        student = load_model(config.student, self.tokenizer, seed=config.seed, key="student")
        if config.loop.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        frozen = {}
        if self.objective.uses_teacher:
            frozen["teacher"] = load_model(
                config.teacher, self.tokenizer, seed=config.seed + 1, key="teacher"
            )
        if self.objective.uses_reference:
            frozen["reference"] = (
                load_model(config.reference, self.tokenizer, seed=config.seed, key="reference")
                if config.reference
                else copy.deepcopy(student)
            )
        weights = config.views.priv_student_weights
        if self.objective.uses_priv_student and weights == "base":
            frozen["priv_student"] = copy.deepcopy(student)
        # The vocabulary rule on the loaded heads: every view is scored, and rollouts sampled,
        # over the ids 0 .. vocab_size - 1 that every head has (equal heads: their own size).
        sizes = {
            "student": output_size(student),
            **{name: output_size(m) for name, m in frozen.items()},
        }
        self.vocab_size = common_vocabulary(sizes, len(self.tokenizer))
        self.ema = (
            EMA(student, config.views.ema_decay)
            if self.objective.uses_priv_student and weights == "ema"
            else None
        )
        optim = config.optim
        optimizer = torch.optim.AdamW(
            student.parameters(),
            lr=optim.lr,
            betas=tuple(optim.betas),
            weight_decay=optim.weight_decay,
        )
        scheduler = get_cosine_schedule_with_warmup(optimizer, optim.warmup_steps, optim.max_steps)
        self.student, self.optimizer, self.scheduler = accelerator.prepare(
            student, optimizer, scheduler
        )
        # Frozen models are replicated on every rank and not checkpointed
        # (the EMA is: TrainingState).
        self.models = {
            name: m.eval().requires_grad_(False).to(accelerator.device)
            for name, m in frozen.items()
        }
        if self.ema is not None:
            self.ema.to(accelerator.device)
            self.models["priv_student"] = self.ema.model
        elif self.objective.uses_priv_student and weights == "live":
            self.models["priv_student"] = accelerator.unwrap_model(self.student)

    # -- training ---------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> None:
        """Run until ``optim.max_steps``, logging, evaluating and checkpointing on schedule.

        ``stop_after`` ends the run early after that many steps (checkpointing then), leaving the
        schedule as ``optim.max_steps`` defines it; a later ``--resume`` continues it exactly.
        """
        loop, max_steps = self.config.loop, self.config.optim.max_steps
        last = max_steps if stop_after is None else min(stop_after, max_steps)
        bar = tqdm(
            total=max_steps,
            initial=self.step,
            desc="train",
            disable=not self.accelerator.is_main_process,
        )
        if self.step == 0 and loop.eval_every and self.eval_prompts:
            self._log({"eval/accuracy": self.evaluate().accuracy})  # the curves' starting point
        self._train_until(last, bar)
        bar.close()
        if self.step == max_steps:
            self._save_final_model()

    def _train_until(self, last: int, bar) -> None:
        loop, max_steps = self.config.loop, self.config.optim.max_steps
        while self.step < last:
            record = self.train_step()
            self.step += 1
            if (
                loop.eval_every
                and self.eval_prompts
                and (self.step % loop.eval_every == 0 or self.step == max_steps)
            ):
                record["eval/accuracy"] = self.evaluate().accuracy
            if self.step % loop.log_every == 0 or self.step == last or "eval/accuracy" in record:
                self._log(record)
            if (loop.save_every and self.step % loop.save_every == 0) or self.step == last:
                save_checkpoint(
                    self.accelerator, self.output_dir, self.step, self.state, self.tokenizer
                )
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics (the same on every rank)."""
        accelerator, rollout = self.accelerator, self.config.rollout
        start = time.perf_counter()
        local = self.sampler.indices(self.step).chunk(accelerator.num_processes)[
            accelerator.process_index
        ]
        policy = accelerator.unwrap_model(self.student)
        policy.eval()  # generation: no dropout, no gradient checkpointing
        rollouts = self.rollout_backend.generate(
            policy,
            [self.prompts["plain"][i] for i in local],
            rollout_seeds(self.config.seed, self.step, local, rollout.num_generations),
        )
        policy.train()
        generated = time.perf_counter()
        rows = local[rollouts.prompt_index.cpu()].tolist()
        view_prompts = {
            name: [self.prompts[kind][i] for i in rows]
            for name, kind in self.prompt_kinds.items()
            if name == "student" or name in self.models
        }
        classes = None
        if self.objective.uses_token_classes:  # [B, T], each rollout token's true class
            classes = completion_token_classes(
                rollouts, self.tokenizer, self.token_roles, self.objective.token_class_names
            )
        batches = make_micro_batches(
            rollouts.completion_ids,
            rollouts.completion_mask,
            view_prompts,
            self.config.optim.micro_batch_size,
            self.tokenizer.pad_token_id,
            token_classes=classes,
            rollout_log_probs=rollouts.sampled_log_probs,
        )
        loop = self.config.loop
        result = run_step(
            accelerator,
            self.objective,
            self.student,
            self.models,
            batches,
            path=loop.loss_path,
            chunk_rows=loop.loss_chunk_rows,
            vocab_size=self.vocab_size,
        )
        metrics = {**result.metrics, **self._optimizer_step(result.loss)}
        if not metrics["skipped_step"]:
            self.rollout_backend.weights_changed()
        if metrics["skipped_step"]:
            self._handle_skip(
                locate_nonfinite(
                    policy,
                    self.models,
                    batches,
                    self.config.objective.name,
                    vocab_size=self.vocab_size,
                )
            )
        else:
            self.consecutive_skips = 0
        metrics["skipped_steps"] = float(self.skipped_steps)
        counts = torch.stack(
            [
                rollouts.completion_mask.sum(),
                rollouts.truncated.sum(),
                torch.tensor(len(rows), device=rollouts.completion_mask.device),
            ]
        ).double()
        tokens, truncated, sequences = sum_across(
            accelerator, counts.to(accelerator.device)
        ).tolist()
        elapsed = time.perf_counter() - start
        metrics.update(
            {
                "completion_length": tokens / sequences,
                "truncated_fraction": truncated / sequences,
                "time/generation": generated - start,
                "time/weight_sync": self.rollout_backend.sync_seconds,
                "time/step": elapsed,
                "tokens_per_second": metrics["completion_tokens"] / elapsed,
            }
        )
        return metrics

    def _optimizer_step(self, loss: torch.Tensor) -> dict[str, float]:
        """Clip, then step unless the loss or gradient is non-finite (the step is then skipped:
        the weights, optimizer moments and EMA stay as they were; the schedule still advances)."""
        max_norm = self.config.optim.max_grad_norm
        params = [p for p in self.student.parameters() if p.grad is not None]
        norm = self.accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        finite = bool(torch.isfinite(torch.as_tensor(norm))) and bool(torch.isfinite(loss))
        if finite:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.accelerator.unwrap_model(self.student))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "grad_norm": float(norm),
            "skipped_step": float(not finite),
            "lr": self.scheduler.get_last_lr()[0],
        }

    def _handle_skip(self, diagnosis: str) -> None:
        """Count a skipped step, warn, and stop the run after too many in a row."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        limit = self.config.optim.max_consecutive_skips
        step = self.step + 1  # the step being taken, numbered as in metrics.jsonl
        self.accelerator.print(
            f"warning: step {step}: non-finite loss or gradient, optimizer step skipped "
            f"({self.consecutive_skips} in a row, {self.skipped_steps} in all): {diagnosis}"
        )
        if self.consecutive_skips >= limit:
            raise DOPDError(
                f"stopped at step {step} after {limit} consecutive non-finite steps "
                f"(optim.max_consecutive_skips={limit}): {diagnosis}"
            )

    def evaluate(self):
        """Held-out accuracy without privileged context, sharded over ranks."""
        accelerator, settings = self.accelerator, self.config.eval
        count = min(settings.max_examples, len(self.eval_prompts["plain"]))
        shard = range(accelerator.process_index, count, accelerator.num_processes)
        result = evaluate(
            accelerator.unwrap_model(self.student),
            self.tokenizer,
            [self.eval_prompts["plain"][i] for i in shard],
            [self.eval_prompts["answer"][i] or "" for i in shard],
            verifier=self.verifier,
            max_new_tokens=settings.max_new_tokens,
        )
        counts = sum_across(
            accelerator, torch.tensor([result.correct, result.total], device=accelerator.device)
        ).tolist()
        result.correct, result.total = int(counts[0]), int(counts[1])
        return result

    def _log(self, record: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps({"step": self.step, **record}) + "\n")

    def _save_final_model(self) -> None:
        save_final_model(self.accelerator, self.student, self.tokenizer, self.output_dir / "model")


def _check_output_dir(
    accelerator: Accelerator, output_dir: Path, resume: bool, overwrite: bool
) -> None:
    """Refuse to mix a new run into an old one unless asked to resume it or replace it (writes
    nothing)."""
    require_support(accelerator)  # fail now, not at the first checkpoint
    if output_dir.exists() and any(output_dir.iterdir()) and not (resume or overwrite):
        raise DOPDError(
            f"output_dir {str(output_dir)!r} is not empty; "
            "pass --resume to continue it or --overwrite to replace it"
        )


def _prepare_output_dir(
    accelerator: Accelerator, output_dir: Path, resume: bool, overwrite: bool
) -> None:
    """Once every input has loaded: clear an ``--overwrite`` run; on resume, delete the
    ``.tmp-`` leftovers of a writer that was killed."""
    if overwrite and not resume and output_dir.exists() and accelerator.is_main_process:
        shutil.rmtree(output_dir)
    if resume and accelerator.is_main_process:
        for path in remove_stale_temporaries(output_dir):
            print(f"removed {path}, left by an interrupted write", file=sys.stderr)
    accelerator.wait_for_everyone()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (left by a run that died after its last checkpoint) and a
    torn line (a run killed mid-write); the file is replaced atomically."""
    if not path.exists():
        return
    kept, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            torn += bool(line.strip())
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and record["step"] <= step
        ):
            kept.append(line)
    if torn:
        print(
            f"warning: {path}: dropped {torn} unreadable line(s), "
            "written by a run that was killed mid-write",
            file=sys.stderr,
        )
    write_text_atomically(path, "".join(line + "\n" for line in kept))
