"""Wall time of one optimizer step, DOPD vs vanilla OPD, on the same tiny models and batch.

    python bench/step.py [--steps 5] [--hidden 256] [--layers 4] [--loss-path auto]
                         [--json out.json]

Both objectives train the same random-init Qwen3 student against the same teacher on the same
prompts; the step is broken into generation, scoring of the constant views, and student
forward+backward. DOPD's extra cost is one no-grad privileged-student forward (docs/method.md
§1) plus its routing; `dopd_over_vanilla` is the ratio of median step times measured in this run.
``--loss-path`` picks ``run_step``'s loss path (``auto``, the trainer's default, takes the chunked
path for these models; ``reference`` the full-logits one). ``--compare-paths`` instead times
``run_step`` (scoring + forward/backward) on both paths over the same micro-batches of every step,
alternating their order, and reports ``chunked_over_reference``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dopd.training.trainer
from dopd.config import LOSS_PATHS, TrainConfig, from_dict
from dopd.training.step import run_step
from dopd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("time/generation", "time/scoring", "time/forward_backward", "time/step")


def bench_config(objective: str, args: argparse.Namespace, output_dir: Path) -> TrainConfig:
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
            "tokenizer": {"characters": " ()*+,-./0123456789=abcdefghijklmnopqrstuvwxyz\n"},
            "data": {"train": str(ROOT / "configs" / "data" / "tiny.jsonl")},
            "objective": {"name": objective},
            "rollout": {
                "prompts_per_step": args.prompts,
                "num_generations": args.generations,
                "max_completion_length": args.length,
            },
            "optim": {
                "lr": 1e-4,
                "max_steps": args.steps + 1,
                "micro_batch_size": args.micro_batch_size,
            },
            "loop": {"save_every": 0, "loss_path": args.loss_path},
        },
    )


def time_objective(objective: str, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per part over ``args.steps`` steps after one warm-up step."""
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(bench_config(objective, args, Path(folder)))
        records = []
        for step in range(args.steps + 1):
            record = trainer.train_step()
            trainer.step += 1
            if step:
                records.append(record)
    return {part: statistics.median(r[part] for r in records) for part in PARTS}


def compare_paths(objective: str, args: argparse.Namespace) -> dict[str, float]:
    """Median ``run_step`` seconds of each loss path, both run on every step's micro-batches (the
    last one run leaves the gradient the optimizer uses)."""
    seconds = {"chunked": [], "reference": []}

    def both_paths(accelerator, objective, student, models, batches, **_):
        order = sorted(seconds, reverse=len(seconds["chunked"]) % 2 == 1)
        for path in order:
            student.zero_grad(set_to_none=True)
            start = time.perf_counter()
            out = run_step(accelerator, objective, student, models, batches, path=path)
            seconds[path].append(time.perf_counter() - start)
        return out

    dopd.training.trainer.run_step = both_paths
    time_objective(objective, args)
    return {path: statistics.median(values[1:]) for path, values in seconds.items()}


def main_compare_paths(args: argparse.Namespace) -> None:
    results = {}
    for name in ("vanilla_opd", "dopd"):
        medians = compare_paths(name, args)
        results[name] = {
            **medians,
            "chunked_over_reference": medians["chunked"] / medians["reference"],
        }
        print(
            f"{name:<12} run_step s: chunked {medians['chunked']:.4f}  "
            f"reference {medians['reference']:.4f}  "
            f"chunked_over_reference = {results[name]['chunked_over_reference']:.3f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "paths": results,
                    "settings": vars(args) | {"json": str(args.json)},
                    "machine": machine(),
                },
                indent=2,
            )
        )


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--loss-path", choices=LOSS_PATHS, default="auto")
    parser.add_argument("--compare-paths", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.compare_paths:
        torch.manual_seed(0)
        return main_compare_paths(args)
    torch.manual_seed(0)
    names = ("vanilla_opd", "priv_teacher_opd", "dopd")
    timings = {name: time_objective(name, args) for name in names}
    ratio = timings["dopd"]["time/step"] / timings["vanilla_opd"]["time/step"]
    # Priv.T->S scores the same privileged teacher input; DOPD adds only the privileged student.
    over_priv = timings["dopd"]["time/step"] / timings["priv_teacher_opd"]["time/step"]
    print(f"{'part':<24}" + "".join(f"{name:>18}" for name in names) + f"{'dopd/vanilla':>14}")
    for part in PARTS:
        row = "".join(f"{timings[name][part]:>18.4f}" for name in names)
        print(f"{part:<24}{row}{timings['dopd'][part] / timings['vanilla_opd'][part]:>14.2f}")
    print(
        f"loss path {args.loss_path}: dopd_over_vanilla = {ratio:.3f}   "
        f"dopd_over_priv_teacher = {over_priv:.3f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "dopd_over_vanilla": ratio,
                    "dopd_over_priv_teacher": over_priv,
                    "timings": timings,
                    "settings": vars(args) | {"json": str(args.json)},
                    "machine": machine(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
