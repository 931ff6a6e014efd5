"""Rollout speed: HF ``generate`` against a vLLM engine in this process, and the HF path's sampler.

    python bench/rollout.py [--repeats 3] [--prompts 16] [--generations 4] [--length 64]
                            [--hidden 256] [--layers 4] [--vocab 151936] [--json out.json]
    .venv-vllm/bin/python bench/rollout.py ...   # with vLLM (bash scripts/setup.sh --vllm)

1. Generation. One random-init Qwen3 student (32-wide heads, as vLLM's CPU attention needs) and
   the same prompts; ``rollout.backend: hf`` (``HFBackend``) and ``vllm`` in colocate mode
   (``VLLMColocateBackend``) each sample ``prompts x generations`` rows of up to ``--length``
   tokens, through the trainer's own backend objects. Rates are generated tokens (valid
   completion positions) per second, median over ``--repeats``; the engine's first call (and its
   build) is not timed. ``vllm_over_hf_tokens_per_s`` is null where vLLM is not importable.
2. Sampler. One decoding step's sampler on ``[rows, --vocab]`` float32 logits: the one-uniform
   inverse-CDF sampler the HF path uses (``HashInverseCDFSampler``) against the sampler it
   replaced, which hashed all V ids of a position into Gumbel noise (written out below as the
   baseline). ``sampler_new_over_old`` is the ratio of median times, in ms per row-position.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dopd.config import TrainConfig, from_dict
from dopd.hashing import hash_uniform, splitmix
from dopd.modeling.loading import check_sources, load_model
from dopd.training.backends import HFBackend
from dopd.training.rollout import HashInverseCDFSampler, rollout_seeds

ROOT = Path(__file__).resolve().parents[1]


def hashed_gumbel_baseline(row_seeds: torch.Tensor, position: int, scores: torch.Tensor):
    """The replaced sampler: hash every ``(row, position, id)`` into a uniform, add Gumbel noise
    to the log-softmax and take the argmax (``[B, 1]`` ids)."""
    vocab = torch.arange(scores.shape[-1], dtype=torch.long)
    row_keys = splitmix(row_seeds + position).unsqueeze(-1)  # [B, 1]
    gumbel = -torch.log(-torch.log(hash_uniform(row_keys ^ vocab)))  # [B, V]
    return (scores.log_softmax(-1) + gumbel.to(scores.dtype)).argmax(-1, keepdim=True)


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_sampler(args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(0)
    rows, prompt_length = args.sampler_rows, 8
    scores = torch.randn(rows, args.vocab, generator=generator) * 3.0  # [B, V]
    seeds = torch.randint(0, 2**62, (rows,), generator=generator)
    input_ids = torch.zeros(rows, prompt_length + 5, dtype=torch.long)  # position 5
    new = HashInverseCDFSampler(seeds, prompt_length)
    calls = {
        "new": lambda: new(input_ids, scores),
        "old": lambda: hashed_gumbel_baseline(seeds, 5, scores),
    }
    for call in calls.values():
        call()  # warm-up
    times = {name: [] for name in calls}
    for repeat in range(args.sampler_repeats):  # alternate the order against drift
        for name in sorted(calls, reverse=repeat % 2 == 1):
            times[name].append(median_seconds(calls[name], 1))
    ms = {name: 1e3 * statistics.median(values) / rows for name, values in times.items()}
    return {
        "vocab": args.vocab,
        "rows": rows,
        "new_ms_per_row_position": ms["new"],
        "old_ms_per_row_position": ms["old"],
        "sampler_new_over_old": ms["new"] / ms["old"],
    }


def generation_config(args: argparse.Namespace) -> TrainConfig:
    heads = args.hidden // 32
    student = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": 3 * args.hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": max(heads // 2, 1),
        "head_dim": 32,
    }
    return from_dict(
        TrainConfig,
        {
            "output_dir": str(ROOT / "runs" / "bench-rollout"),
            "seed": 0,
            "student": {"tiny": student},
            "teacher": {"tiny": student},
            "tokenizer": {"characters": " ()*+,-./0123456789=abcdefghijklmnopqrstuvwxyz\n"},
            "data": {
                "train": str(ROOT / "configs" / "data" / "tiny.jsonl"),
                "max_prompt_length": 64,
            },
            "rollout": {
                "prompts_per_step": args.prompts,
                "num_generations": args.generations,
                "max_completion_length": args.length,
                "temperature": 1.0,
                "vllm_gpu_memory_utilization": 0.3,
            },
        },
    )


def tokens_per_second(backend, student, prompts, seeds, repeats: int) -> dict:
    backend.generate(student, prompts, seeds)  # warm-up (and, for vLLM, the first weight load)
    times, tokens = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = backend.generate(student, prompts, seeds)
        times.append(time.perf_counter() - start)
        tokens.append(int(out.completion_mask.sum()))
    rates = [count / seconds for count, seconds in zip(tokens, times, strict=True)]
    return {
        "tokens_per_s": statistics.median(rates),
        "seconds": statistics.median(times),
        "tokens": statistics.median(tokens),
    }


def bench_generation(args: argparse.Namespace) -> dict:
    config = generation_config(args)
    tokenizer = check_sources(config)
    student = load_model(config.student, tokenizer, seed=0, key="student").eval()
    student.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    letters = tokenizer.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz"))
    prompts = [
        [letters[i] for i in torch.randint(0, 26, (12,), generator=generator).tolist()]
        for _ in range(args.prompts)
    ]
    seeds = rollout_seeds(0, 0, torch.arange(args.prompts), args.generations)
    vocab = len(tokenizer)
    hf = HFBackend(config.rollout, tokenizer, vocab)
    result = {"hf": tokens_per_second(hf, student, prompts, seeds, args.repeats), "vllm": None}
    if importlib.util.find_spec("vllm") is not None:
        from dopd.training.backends import VLLMColocateBackend

        backend = VLLMColocateBackend(config, tokenizer, vocab, student)
        result["vllm"] = tokens_per_second(backend, student, prompts, seeds, args.repeats)
    result["vllm_over_hf_tokens_per_s"] = (
        result["vllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"] if result["vllm"] else None
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--sampler-rows", type=int, default=64)
    parser.add_argument("--sampler-repeats", type=int, default=15)
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)

    sampler = bench_sampler(args)
    print(
        f"sampler at V={sampler['vocab']:,}: new {sampler['new_ms_per_row_position']:.4f} ms, "
        f"old {sampler['old_ms_per_row_position']:.4f} ms per row-position; "
        f"sampler_new_over_old = {sampler['sampler_new_over_old']:.3f}"
    )
    generation = None if args.skip_generation else bench_generation(args)
    if generation is not None:
        for name in ("hf", "vllm"):
            if generation[name] is None:
                print(f"{name:>5}: vLLM not importable (bash scripts/setup.sh --vllm)")
            else:
                part = generation[name]
                print(
                    f"{name:>5}: {part['tokens_per_s']:8.1f} tokens/s "
                    f"({part['tokens']} tokens in {part['seconds']:.3f} s)"
                )
        ratio = generation["vllm_over_hf_tokens_per_s"]
        print("vllm_over_hf_tokens_per_s =", "null" if ratio is None else f"{ratio:.2f}")
    if args.json:
        report = {
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            "args": {key: str(value) for key, value in vars(args).items()},
            "sampler": sampler,
            "sampler_new_over_old": sampler["sampler_new_over_old"],
            "generation": generation,
            "vllm_over_hf_tokens_per_s": generation and generation["vllm_over_hf_tokens_per_s"],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
