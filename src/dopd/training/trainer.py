"""The on-policy distillation trainer: rollouts from the current student, three-view scoring,
one exact optimizer step, metrics, evaluation and checkpoints, on accelerate.

The same code runs on 1 CPU, 1 GPU, multi-GPU DDP and FSDP2 (DeepSpeed is refused): launch it
with ``accelerate launch [--config_file configs/accelerate/...] -m dopd.cli train --config ...``.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from dopd.config import PromptView, TrainConfig, save_config
from dopd.errors import ConfigError, DOPDError
from dopd.io.atomic import replacing
from dopd.io.data import load_examples
from dopd.modeling.ema import EMA
from dopd.modeling.loading import check_sources, common_vocabulary, load_model, output_size
from dopd.modeling.peft import (
    AdapterEMA,
    apply_lora,
    initial_weights,
    save_lora_model,
    trainable_parameters,
)
from dopd.objectives.views import ViewName
from dopd.training.backends import check_backend, make_backend
from dopd.training.checkpoint import (
    TrainingState,
    load_latest_checkpoint,
    save_checkpoint,
    save_final_model,
)
from dopd.training.distributed import check_sharding, check_world_size, sum_across
from dopd.training.evaluation import evaluate, load_verifier
from dopd.training.faults import locate_nonfinite
from dopd.training.prompts import tokenized_prompts
from dopd.training.rollout import PromptSampler, completion_token_classes, rollout_seeds
from dopd.training.run_dir import check_output_dir, prepare_output_dir
from dopd.training.run_lock import lock_run
from dopd.training.shards import is_sharded
from dopd.training.step import make_micro_batches, run_step
from dopd.training.tracking import RunRecords, accelerator_options, quiet_progress_bars
from dopd.training.vlm_data import (
    eval_images,
    eval_prompts,
    row_images,
    vlm_processor,
    vlm_prompts,
)


def _closes_on_error(method):
    """``Trainer.close()`` (releasing the run lock) when ``method`` raises, then re-raise."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self.close()
            raise

    return wrapper


class Trainer:
    """Builds everything a run needs from a ``TrainConfig`` and trains it.

    The main process holds ``output_dir``'s run lock (``dopd.training.run_lock``) from the start
    of ``__init__`` until ``train`` ends or raises, or ``close()``; ``with Trainer(...) as t:``
    closes too. A second trainer on the same folder, in this process or another, is refused.
    """

    @_closes_on_error
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
            mixed_precision=config.loop.mixed_precision,
            step_scheduler_with_optimizer=False,
            **accelerator_options(config),  # tracking.report_to's trackers, checked installed
        )
        check_world_size(self.accelerator)
        check_sharding(self.accelerator, config)
        # One writer per output_dir, before it is checked, cleared (--overwrite) or written.
        self._run_lock, self._locked = None, False
        self._lock()
        check_output_dir(self.accelerator, self.output_dir, resume, overwrite)
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
        self.processor = vlm_processor(config, self.tokenizer)  # None: a text run
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
        prepare_output_dir(self.accelerator, self.output_dir, resume, overwrite)
        self.step, self.skipped_steps, self.consecutive_skips = 0, 0, 0
        self.state = TrainingState(self.student, self.optimizer, self.scheduler, self.ema)
        if resume:
            self.step = load_latest_checkpoint(self.accelerator, self.output_dir, self.state)
        if self.accelerator.is_main_process:
            # Atomic: `--resume --config output_dir/config.yaml` must never meet a torn file.
            with replacing(self.output_dir / "config.yaml") as temp:
                save_config(config, temp)
        self.records = RunRecords(self.accelerator, config, self.tokenizer, self.step)

    # -- setup ------------------------------------------------------------------------------
    def _load_data(self, verifier) -> None:
        data = self.config.data
        columns = data.columns.mapping()
        if self.processor is not None:  # vision rows: prompt ids and image tensors, once
            self.prompts = vlm_prompts(self.processor, self.config, self._warn)
        else:
            train = load_examples(data.train, columns, subset=data.subset)
            self.prompts = tokenized_prompts(
                train, self.tokenizer, self.config, "train", self._warn
            )
        if len(self.prompts["plain"]) == 0:
            raise DOPDError(
                f"data.train={data.train!r}: every prompt is longer than "
                f"data.max_prompt_length={data.max_prompt_length}; "
                "fix: raise data.max_prompt_length or shorten the prompts"
            )
        # Evaluation decodes the plain prompt only (with a vision row's images).
        self.eval_prompts = eval_prompts(self.config, self.tokenizer, self.processor, self._warn)
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

    def _warn(self, message: str) -> None:
        self.accelerator.print(f"warning: {message}")

    def _build_models(self) -> None:
        config, accelerator = self.config, self.accelerator
        student = load_model(config.student, self.tokenizer, seed=config.seed, key="student")
        if config.peft.enabled:  # only the LoRA adapters train (dopd.modeling.peft)
            student = apply_lora(student, config.peft, engine=accelerator.distributed_type)
            accelerator.print(
                "peft: {:,} of {:,} parameters train".format(*trainable_parameters(student))
            )
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
                else initial_weights(student)
            )
        weights = config.views.priv_student_weights
        if self.objective.uses_priv_student and weights == "base":
            frozen["priv_student"] = initial_weights(student)  # LoRA: adapters off, no copy
        # The vocabulary rule on the loaded heads: every view is scored, and rollouts sampled,
        # over the ids 0 .. vocab_size - 1 that every head has (equal heads: their own size).
        sizes = {
            "student": output_size(student),
            **{name: output_size(m) for name, m in frozen.items()},
        }
        self.vocab_size = common_vocabulary(sizes, len(self.tokenizer))
        self.ema = (
            (AdapterEMA if config.peft.enabled else EMA)(student, config.views.ema_decay)
            if self.objective.uses_priv_student and weights == "ema"
            else None
        )
        optim = config.optim
        optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad],
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
            name: self._place_frozen(m.eval().requires_grad_(False)) for name, m in frozen.items()
        }
        if self.ema is not None:
            self.ema.to(accelerator.device)
            self.models["priv_student"] = self.ema.model
        elif self.objective.uses_priv_student and weights == "live":
            self.models["priv_student"] = accelerator.unwrap_model(self.student)

    def _place_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen view's model on this rank: sharded like the student under FSDP2 (no optimizer
        state), else a whole replica on the device."""
        if self.accelerator.distributed_type == DistributedType.FSDP:
            # accelerate shards a model alone through prepare() (prepare_model refuses FSDP2).
            return self.accelerator.prepare(model)
        return model.to(self.accelerator.device)

    def _lock(self) -> None:
        """Take ``output_dir``'s run lock (main process) unless this trainer holds it."""
        if not self._locked:
            self._run_lock, self._locked = lock_run(self.accelerator, self.output_dir), True

    def close(self) -> None:
        """Release ``output_dir``'s run lock (deleting the lock file); idempotent. ``train``
        calls it when it ends or raises, and a later ``train`` takes the lock again."""
        if getattr(self, "_run_lock", None) is not None:
            self._run_lock.release()
        self._locked = False
        if getattr(self, "records", None) is not None:
            self.records.finish()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- training ---------------------------------------------------------------------------
    @_closes_on_error
    def train(self, stop_after: int | None = None) -> None:
        """Run until ``optim.max_steps``, logging, evaluating and checkpointing on schedule.

        ``stop_after`` ends the run early after that many steps (checkpointing then), leaving the
        schedule as ``optim.max_steps`` defines it; a later ``--resume`` continues it exactly.
        The run lock is released when it returns or raises (``close``).
        """
        self._lock()
        self.records.start()
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
            with quiet_progress_bars():  # no "Writing model shards" bar below the run's
                self._save_final_model()
        self.close()

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
                    self.accelerator,
                    self.output_dir,
                    self.step,
                    self.state,
                    save_total_limit=self.config.checkpoint.save_total_limit,
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
        vlm = self.processor is not None
        rollouts = self.rollout_backend.generate(
            policy,
            [self.prompts["plain"][i] for i in local],
            rollout_seeds(self.config.seed, self.step, local, rollout.num_generations),
            **({"images": row_images(self.processor, self.prompts, local.tolist())} if vlm else {}),
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
            images=row_images(self.processor, self.prompts, rows) if vlm else None,
            image_token_id=getattr(self.processor, "image_token_id", None),
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
            record_tokens=self.records.sample_due(self.step + 1),
        )
        self.records.write_samples(self.step + 1, result.tokens, view_prompts["student"], rows)
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
        shard = list(range(accelerator.process_index, count, accelerator.num_processes))
        policy, real = accelerator.unwrap_model(self.student), len(shard)
        synced = is_sharded(policy)
        if synced:  # sharded forwards are collective: every rank decodes as many prompts
            shard += [0] * (-(-count // accelerator.num_processes) - real)
        result = evaluate(
            policy,
            self.tokenizer,
            [self.eval_prompts["plain"][i] for i in shard],
            [self.eval_prompts["answer"][i] or "" for i in shard],
            verifier=self.verifier,
            max_new_tokens=settings.max_new_tokens,
            synced=synced,
            images=eval_images(self.processor, self.eval_prompts, shard),
        )
        result = result.first(real)  # without the padding
        counts = sum_across(
            accelerator, torch.tensor([result.correct, result.total], device=accelerator.device)
        ).tolist()
        result.correct, result.total = int(counts[0]), int(counts[1])
        return result

    def _log(self, record: dict[str, float]) -> None:
        self.records.log(self.step, record)  # metrics.jsonl and the trackers

    def _save_final_model(self) -> None:
        target, peft = self.output_dir / "model", self.config.peft
        if peft.enabled:  # the merged model or the adapter alone (peft.export)
            save_lora_model(self.accelerator, self.student, self.tokenizer, target, peft.export)
        else:
            tokenizer = self.processor or self.tokenizer  # a VLM's folder gets its processor
            save_final_model(
                self.accelerator, self.student, tokenizer, target, self._export_dtype()
            )

    def _export_dtype(self) -> torch.dtype | None:
        """``checkpoint.export_dtype`` as a torch dtype; None keeps the student's own."""
        name = self.config.checkpoint.export_dtype
        if name == "auto":
            name = {"bf16": "bfloat16", "fp16": "float16"}.get(self.config.loop.mixed_precision)
        return None if name is None else getattr(torch, name)
