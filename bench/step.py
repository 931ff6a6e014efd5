"""Wall time of one optimizer step, DOPD vs vanilla OPD, on the same tiny models and batch.

    python bench/step.py [--steps 5] [--hidden 256] [--layers 4] [--json out.json]

Both objectives train the same random-init Qwen3 student against the same teacher on the same
prompts; the step is broken into generation, scoring of the constant views, and student
forward+backward. DOPD's extra cost is one no-grad privileged-student forward (METHOD.md section
1) plus its routing; `dopd_over_vanilla` is the ratio of median step times measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dopd.config import TrainConfig, from_dict
from dopd.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("time/generation", "time/scoring", "time/forward_backward", "time/step")


def bench_config(objective: str, args: argparse.Namespace, output_dir: Path) -> TrainConfig:
    model = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "intermediate_size": 3 * args.hidden}
    teacher = {**model, "hidden_size": 2 * args.hidden, "intermediate_size": 6 * args.hidden}
    return from_dict(TrainConfig, {
        "output_dir": str(output_dir), "seed": 0,
        "student": {"tiny": model}, "teacher": {"tiny": teacher},
        "tokenizer": {"characters": " ()*+,-./0123456789=abcdefghijklmnopqrstuvwxyz\n"},
        "data": {"train": str(ROOT / "configs" / "data" / "tiny.jsonl")},
        "objective": {"name": objective},
        "rollout": {"prompts_per_step": args.prompts, "num_generations": args.generations, "max_completion_length": args.length},
        "optim": {"lr": 1e-4, "max_steps": args.steps + 1, "micro_batch_size": args.micro_batch_size},
        "loop": {"save_every": 0},
    })


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
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
    print(f"dopd_over_vanilla = {ratio:.3f}   dopd_over_priv_teacher = {over_priv:.3f}")
    if args.json:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        args.json.write_text(json.dumps({"dopd_over_vanilla": ratio, "dopd_over_priv_teacher": over_priv, "timings": timings, "settings": vars(args) | {"json": str(args.json)}, "machine": machine}, indent=2))


if __name__ == "__main__":
    main()
