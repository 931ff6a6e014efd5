"""Time of one vanilla-OPD optimizer step, dopd vs TRL's ``DistillationTrainer``, same models
and batch.

    bash bench/vs_trl.sh --steps 20 --profile 3 --json docs/bench-vs-trl-cpu.json

``bench/vs_trl.sh`` builds the TRL virtualenv once and runs this file in it: TRL (pinned in
``bench/requirements-trl.txt``) lives only there, never in dopd's dependencies. Three trainers
step in turn, interleaved round by round so that load on a shared machine hits all alike:

* ``trl``: ``trl.DistillationTrainer`` with ``beta=1``: full-vocabulary reverse KL(student ||
  teacher) at every completion token, summed and divided by the step's valid-token count;
* ``vanilla_opd``: dopd's vanilla OPD, the sampled-token reverse-KL surrogate (the same expected
  gradient, an unbiased one-sample estimate of it) with the paper's per-sequence mean;
* ``reverse_kl_full``: dopd's ``reverse_kl_full`` with the plain teacher and ``token_mean``, the
  objective equal to TRL's loss (checked here on one batch: loss and gradient).

Identical random-init Qwen3 student and teacher (``dopd.modeling.tiny``, same seeds), the same
prompts per step (dopd's prompt schedule, each prompt repeated ``--generations`` times for TRL,
which samples one completion per row), the same micro-batch and accumulation, AdamW with the
same cosine schedule, float32 on CPU, sampling at temperature 1 up to ``--length`` tokens with
the same EOS.
The two samplers draw different completions, so the tokens per step are reported next to the
times. Wall and process CPU time are both recorded (``--threads 1`` by default: CPU time then
measures work even on a loaded machine). ``ours_over_trl`` is the median step time of
``vanilla_opd`` over TRL's, in this run; ``--profile N`` adds N rounds under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import trl
    from trl import DistillationConfig, DistillationTrainer
except ImportError as error:  # the system environment has no TRL, on purpose
    raise SystemExit(
        f"{error}: run this bench with `bash bench/vs_trl.sh`, "
        "which installs the pinned TRL in a venv"
    ) from None
import transformers
from datasets import Dataset
from transformers import TrainerCallback, get_cosine_schedule_with_warmup

import dopd.training.backends as dopd_backends
from dopd.config import TrainConfig, from_dict
from dopd.io.data import load_examples
from dopd.modeling.alignment import build_view_inputs, completion_logits, left_pad
from dopd.modeling.loading import load_model
from dopd.objectives.base import objective_loss
from dopd.training.rollout import generate_rollouts, rollout_seeds
from dopd.training.trainer import Trainer
from gpu import DATA_CHARACTERS, characters

ROOT = Path(__file__).resolve().parents[1]
PIN = (ROOT / "bench" / "requirements-trl.txt").read_text().split("trl==")[1].split()[0]
# Our objective equal to TRL's beta = 1 loss: full-vocabulary reverse KL, plain teacher, token mean.
OURS = {
    "vanilla_opd": {"objective": {"name": "vanilla_opd"}},
    "reverse_kl_full": {
        "objective": {"name": "reverse_kl_full", "reduction": "token_mean"},
        "views": {"teacher": "plain"},
    },
}


def dopd_config(extra: dict, args: argparse.Namespace, output_dir: Path) -> TrainConfig:
    """The shapes and batch of ``bench/step.py``; ``extra`` picks the objective."""
    model = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": 3 * args.hidden,
    }
    teacher = {**model, "hidden_size": 2 * args.hidden, "intermediate_size": 6 * args.hidden}
    return from_dict(
        TrainConfig,
        {
            "output_dir": str(output_dir),
            "seed": 0,
            "student": {"tiny": model},
            "teacher": {"tiny": teacher},
            "tokenizer": {"characters": characters(args.vocab) if args.vocab else DATA_CHARACTERS},
            "data": {"train": str(ROOT / "configs" / "data" / "tiny.jsonl")},
            "rollout": {
                "prompts_per_step": args.prompts,
                "num_generations": args.generations,
                "max_completion_length": args.length,
                "temperature": 1.0,
            },
            # The profiled rounds follow the timed ones: the same schedule for all three trainers.
            "optim": {
                "lr": 1e-4,
                "max_steps": args.warmup + args.steps + args.profile,
                "micro_batch_size": args.micro_batch_size,
            },
            "loop": {"save_every": 0},
            **extra,
        },
    )


def clock() -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process): CPU time is robust to a loaded
    machine."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


# Wall and CPU seconds of each trainer's last rollout generation and its valid completion tokens.
LAST_GENERATION: dict[str, tuple[float, float, int]] = {}


def _timed_generate_rollouts(*args, **kwargs):
    start = clock()
    rollouts = generate_rollouts(*args, **kwargs)
    LAST_GENERATION["dopd"] = (*since(start), int(rollouts.completion_mask.sum()))
    return rollouts


class TimedDistillationTrainer(DistillationTrainer):
    """TRL's trainer, unchanged, plus the time and valid tokens of each rollout generation."""

    def _generate_and_score_completions(self, inputs):
        start = clock()
        output = super()._generate_and_score_completions(inputs)
        LAST_GENERATION["trl"] = (*since(start), int(output["completion_mask"].sum()))
        return output


def build_trl(
    reference: Trainer, args: argparse.Namespace, output_dir: Path
) -> TimedDistillationTrainer:
    """TRL's trainer on fresh copies of ``reference``'s initial models, prompts and optimizer."""
    config, tokenizer = reference.config, reference.tokenizer
    rows = args.prompts * args.generations
    if rows % args.micro_batch_size:
        raise ValueError(
            f"--prompts x --generations = {rows} must be a multiple of "
            f"--micro-batch-size={args.micro_batch_size}"
        )
    texts = [example.prompt for example in load_examples(config.data.train)]
    if [tokenizer(text)["input_ids"] for text in texts] != reference.prompts["plain"]:
        raise ValueError(
            "TRL would tokenize the prompts differently from dopd; "
            "the comparison needs the same ids"
        )
    # dopd's prompt schedule, each prompt repeated once per generation: TRL samples one completion
    # per row and, unshuffled, walks the rows in order, one step's rows per generation batch.
    order = [
        texts[i]
        for step in range(config.optim.max_steps)
        for i in reference.sampler.indices(step).tolist()
    ]
    dataset = Dataset.from_dict(
        {"prompt": [text for text in order for _ in range(args.generations)]}
    )
    student = load_model(config.student, tokenizer, seed=config.seed)
    teacher = load_model(config.teacher, tokenizer, seed=config.seed + 1)
    optim = config.optim
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, optim.warmup_steps, optim.max_steps)
    trl_args = DistillationConfig(
        output_dir=str(output_dir),
        seed=config.seed,
        max_steps=optim.max_steps,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=rows // args.micro_batch_size,
        max_grad_norm=optim.max_grad_norm,
        max_completion_length=args.length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=1.0,
        shuffle_dataset=False,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,  # TRL defaults both to on
        report_to="none",
        save_strategy="no",
        logging_steps=optim.max_steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return TimedDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=trl_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        optimizers=(optimizer, scheduler),
    )


def check_same_loss(
    trl_trainer: TimedDistillationTrainer, ours: Trainer, args: argparse.Namespace
) -> dict[str, float]:
    """TRL's loss and dopd's ``reverse_kl_full`` on one batch, same weights: max abs differences."""
    student, teacher = trl_trainer.model, trl_trainer.teacher_model
    tokenizer, prompts = ours.tokenizer, [ours.prompts["plain"][i] for i in ours.sampler.indices(0)]
    rollouts = generate_rollouts(
        student,
        prompts,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_completion_length=args.length,
        num_generations=args.generations,
        row_seeds=rollout_seeds(0, 0, ours.sampler.indices(0), args.generations),
    )
    ids, mask = rollouts.completion_ids, rollouts.completion_mask  # [B, T]
    rows = [prompt for prompt in prompts for _ in range(args.generations)]
    prompt_ids, prompt_mask = left_pad(rows, tokenizer.pad_token_id, ids.device)  # [B, P]
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": ids,
        "completion_mask": mask.long(),
    }
    losses, grads = [], []
    for path in ("trl", "dopd"):
        if path == "trl":
            loss = trl_trainer._compute_loss(student, inputs, mask.sum())[0]
        else:
            view = build_view_inputs(rows, ids, mask, tokenizer.pad_token_id)
            with torch.no_grad():
                teacher_logits = completion_logits(teacher, view)  # [B, T, V]
            loss = objective_loss(
                ours.objective, completion_logits(student, view), None, teacher_logits, ids, mask
            ).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
        student.zero_grad(set_to_none=True)
    return {
        "trl_loss": losses[0],
        "dopd_loss": losses[1],
        "loss_abs_err": abs(losses[0] - losses[1]),
        "grad_max_abs_err": (grads[0] - grads[1]).abs().max().item(),
        "grad_max_abs": grads[0].abs().max().item(),
    }


class Interleave(TrainerCallback):
    """After each TRL optimizer step, run one step of each dopd trainer; time all of them.

    A TRL step is timed from the end of the previous dopd steps to TRL's ``on_step_end``, so it
    includes everything TRL's loop does per step (batch fetch, generation, loss, optimizer, logs).
    Rounds after the first ``timed_rounds`` run under one cProfile per trainer instead (CPU time).
    """

    def __init__(self, ours: dict[str, Trainer], timed_rounds: int):
        self.ours, self.timed_rounds = ours, timed_rounds
        self.records = {"trl": [], **{name: [] for name in ours}}
        self.profilers = {name: cProfile.Profile(time.process_time) for name in self.records}

    def on_train_begin(self, args, state, control, **kwargs):
        self.resume = clock()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = since(self.resume)
        profiled = state.global_step > self.timed_rounds
        if profiled:
            self.profilers["trl"].disable()
        else:
            self.records["trl"].append(_record(elapsed, LAST_GENERATION["trl"]))
        for name in list(self.ours) if state.global_step % 2 else list(self.ours)[::-1]:
            self._dopd_step(name, profiled)
        if self.timed_rounds <= state.global_step < state.max_steps:
            self.profilers["trl"].enable()
        self.resume = clock()

    def on_train_end(self, args, state, control, **kwargs):
        self.profilers["trl"].disable()

    def _dopd_step(self, name: str, profiled: bool) -> None:
        trainer, start = self.ours[name], clock()
        if profiled:
            self.profilers[name].enable()
        record = trainer.train_step()
        trainer.step += 1
        if profiled:
            self.profilers[name].disable()
            return
        parts = {
            "scoring": record["time/scoring"],
            "forward_backward": record["time/forward_backward"],
        }
        self.records[name].append(_record(since(start), LAST_GENERATION["dopd"]) | parts)

    def profiles(self, lines: int = 30) -> dict[str, str]:
        """Each trainer's top functions by cumulative and by own CPU time over the profiled
        rounds."""
        texts = {}
        for name, profiler in self.profilers.items():
            if profiler.getstats():
                text = io.StringIO()
                for key in ("cumulative", "tottime"):
                    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(key).print_stats(
                        lines
                    )
                texts[name] = "\n".join(
                    line for line in text.getvalue().splitlines() if line.strip()
                )
        return texts


def _record(step: tuple[float, float], generation: tuple[float, float, int]) -> dict[str, float]:
    return {
        "step": step[0],
        "generation": generation[0],
        "cpu_step": step[1],
        "cpu_generation": generation[1],
        "completion_tokens": generation[2],
    }


def summarize(records: list[dict], warmup: int) -> dict[str, float]:
    """Medians over the timed steps, plus what follows generation and the time per completion
    token."""
    timed = records[warmup:]
    summary = {key: statistics.median(r[key] for r in timed) for key in timed[0]}
    for prefix in ("", "cpu_"):
        summary[f"{prefix}after_generation"] = statistics.median(
            r[f"{prefix}step"] - r[f"{prefix}generation"] for r in timed
        )
        summary[f"{prefix}ms_per_completion_token"] = 1e3 * statistics.median(
            r[f"{prefix}step"] / r["completion_tokens"] for r in timed
        )
    return summary


def paired_ratio(ours: list[dict], trl_records: list[dict], key: str, warmup: int) -> float:
    """Median over steps of ours / TRL in the same round: what drifts over the run cancels."""
    return statistics.median(a[key] / b[key] for a, b in zip(ours[warmup:], trl_records[warmup:]))


ROWS = (
    "generation",
    "after_generation",
    "step",
    "cpu_generation",
    "cpu_after_generation",
    "cpu_step",
    "completion_tokens",
    "ms_per_completion_token",
    "cpu_ms_per_completion_token",
)


def print_table(timings: dict[str, dict[str, float]]) -> None:
    names = list(timings)
    print(
        f"{'median per step (s)':<30}"
        + "".join(f"{name:>17}" for name in names)
        + "".join(f"{name[:10] + '/trl':>16}" for name in names[1:])
    )
    for key in ROWS:
        row = "".join(f"{timings[name][key]:>17.4f}" for name in names)
        ratios = "".join(f"{timings[name][key] / timings['trl'][key]:>16.3f}" for name in names[1:])
        print(f"{key:<30}{row}{ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument(
        "--vocab",
        type=int,
        default=0,
        help=(
            "widen the character vocabulary to this many tokens "
            "(0: the data's 47 characters + 4 special tokens)"
        ),
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--profile", type=int, default=0, help="rounds run under cProfile after the timed ones"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); one thread keeps CPU time a faithful "
        "measure of work on a shared machine, where idle threads spin",
    )
    args = parser.parse_args()
    if trl.__version__ != PIN:
        raise SystemExit(
            f"TRL {trl.__version__} is installed but bench/requirements-trl.txt pins {PIN}; "
            "rebuild the venv"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    # dopd's HF backend calls generate_rollouts through its module namespace: time it there.
    dopd_backends.generate_rollouts = _timed_generate_rollouts
    with tempfile.TemporaryDirectory() as folder:
        ours = {
            name: Trainer(dopd_config(extra, args, Path(folder) / name))
            for name, extra in OURS.items()
        }
        trl_trainer = build_trl(ours["reverse_kl_full"], args, Path(folder) / "trl")
        loss_check = check_same_loss(trl_trainer, ours["reverse_kl_full"], args)
        print(
            "same batch, same weights:", ", ".join(f"{k} = {v:.3g}" for k, v in loss_check.items())
        )
        interleave = Interleave(ours, args.warmup + args.steps)
        trl_trainer.add_callback(interleave)
        trl_trainer.train()
    timings = {
        name: summarize(records, args.warmup) for name, records in interleave.records.items()
    }
    print_table(timings)
    records = interleave.records
    ratios = {
        "ours_over_trl": timings["vanilla_opd"]["step"] / timings["trl"]["step"],
        "ours_over_trl_paired": paired_ratio(
            records["vanilla_opd"], records["trl"], "step", args.warmup
        ),
        "ours_over_trl_cpu": timings["vanilla_opd"]["cpu_step"] / timings["trl"]["cpu_step"],
        "ours_reverse_kl_full_over_trl": timings["reverse_kl_full"]["step"]
        / timings["trl"]["step"],
        "ours_reverse_kl_full_over_trl_paired": paired_ratio(
            records["reverse_kl_full"], records["trl"], "step", args.warmup
        ),
        "ours_reverse_kl_full_over_trl_cpu": timings["reverse_kl_full"]["cpu_step"]
        / timings["trl"]["cpu_step"],
    }
    print("   ".join(f"{key} = {value:.3f}" for key, value in ratios.items()))
    profiles = interleave.profiles()
    for name, text in profiles.items():
        print(f"--- {name}: cProfile, CPU seconds over {args.profile} steps ---\n{text}")
    if args.json:
        machine = {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "load_average_end": os.getloadavg()[0],
            "device": "cpu",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        args.json.write_text(
            json.dumps(
                {
                    **ratios,
                    "timings": timings,
                    "loss_check": loss_check,
                    "steps": records,
                    "profiles": profiles,
                    "settings": vars(args) | {"json": str(args.json)},
                    "machine": machine,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
