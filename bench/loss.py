"""Peak memory and time of the chunked DOPD loss vs the naive three-full-logits path.

    python bench/loss.py --quick                      # small vocabulary, a smoke run (~1 min)
    python bench/loss.py --json docs/bench_loss.json  # V = 151,936, d in {1024, 2048}, 4k-16k rows

Both paths start from the same hidden states and output heads and include the projections:

* naive: ``[B, T, V]`` logits of the student, privileged student and teacher, then
  ``objective_loss`` and backward (what a trainer without chunking does);
* efficient: ``chunked_objective_loss`` (statistics pass, then loss pass with in-forward gradients).

Every (path, repetition) runs in a fresh subprocess, alternating the paths so that load on a
shared machine hits both alike. Peak memory is the growth of the process's peak RSS (VmHWM, reset
through /proc/self/clear_refs after the inputs are allocated; ru_maxrss where that is missing),
time is the median wall time of forward+backward. A configuration whose naive path would not fit
in the available memory runs the efficient path only, with a printed note.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dopd.objectives.base import objective_loss
from dopd.objectives.chunked import chunked_objective_loss
from dopd.objectives.dopd import DOPD, DOPDConfig
from dopd.objectives.reduction import row_weights
from dopd.objectives.views import ViewHead

SEQUENCE_LENGTH = 1024  # rows are laid out as [N / T, T] completions, all tokens valid
# Peak bytes per logit (naive: per N x V; efficient: per chunk_rows x V), measured with this script
# at V = 151,936 (8.3 and 6-11 floats), with margin; used only to skip what cannot fit.
NAIVE_BYTES_PER_LOGIT = 4 * 9.0
EFFICIENT_BYTES_PER_LOGIT = 4 * 12.0


@dataclass(frozen=True)
class Config:
    """One benchmark configuration."""

    vocab: int
    hidden: int
    rows: int
    chunk_rows: int
    seed: int = 0


def make_inputs(config: Config) -> dict[str, torch.Tensor]:
    """Student, privileged-student and teacher hidden states ``[N, d]`` and heads ``[V, d]``.

    Logit scale as in a trained LM: background logits ~ N(0, 2.5^2) and each row's sampled token
    ``y`` lifted by a margin in [5, 25] (probabilities from ~1e-5 to ~1); the privileged student is
    a noisy copy of the student and the teacher is more confident on ``y`` by a random amount, so
    every DOPD regime is populated.
    """
    generator = torch.Generator().manual_seed(config.seed)
    n, d, v = config.rows, config.hidden, config.vocab

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator)

    student_head = normal(v, d) * (2.5 / math.sqrt(d))  # [V, d], rows of norm ~2.5
    teacher_head = student_head + normal(v, d) * (0.5 / math.sqrt(d))  # [V, d]
    token_ids = torch.randint(0, v, (n,), generator=generator)  # [N]
    direction = student_head[token_ids] / student_head[token_ids].square().sum(
        -1, keepdim=True
    )  # [N, d], logit +1 on y
    student_hidden = normal(n, d) + (5 + 20 * uniform(n, 1)) * direction  # [N, d]
    priv_student_hidden = (
        student_hidden + 0.3 * normal(n, d) + 3 * normal(n, 1) * direction
    )  # [N, d]
    teacher_hidden = (
        priv_student_hidden + 0.3 * normal(n, d) + 6 * normal(n, 1) * direction
    )  # [N, d]
    return {
        "student_hidden": student_hidden,
        "student_head": student_head,
        "priv_student_hidden": priv_student_hidden,
        "teacher_hidden": teacher_hidden,
        "teacher_head": teacher_head,
        "token_ids": token_ids,
    }


def naive_loss(inputs: dict[str, torch.Tensor], objective: DOPD) -> torch.Tensor:
    """``objective_loss`` on three full ``[B, T, V]`` logits projected from the hidden states."""
    n = inputs["token_ids"].shape[0]
    shape = (n // SEQUENCE_LENGTH, SEQUENCE_LENGTH, -1)
    student_logits = (inputs["student_hidden"] @ inputs["student_head"].T).view(shape)  # [B, T, V]
    with torch.no_grad():
        priv_student_logits = (inputs["priv_student_hidden"] @ inputs["student_head"].T).view(
            shape
        )  # [B, T, V]
        teacher_logits = (inputs["teacher_hidden"] @ inputs["teacher_head"].T).view(
            shape
        )  # [B, T, V]
    ids = inputs["token_ids"].view(shape[:2])  # [B, T]
    mask = torch.ones_like(ids, dtype=torch.bool)  # [B, T]
    return objective_loss(
        objective, student_logits, priv_student_logits, teacher_logits, ids, mask
    ).loss


def efficient_loss(
    inputs: dict[str, torch.Tensor], objective: DOPD, chunk_rows: int
) -> torch.Tensor:
    """``chunked_objective_loss`` on the same rows (thresholds computed inside, as the naive
    path)."""
    n = inputs["token_ids"].shape[0]
    mask = torch.ones(n // SEQUENCE_LENGTH, SEQUENCE_LENGTH, dtype=torch.bool)  # [B, T]
    weights = row_weights(mask, objective.config.reduction)  # [N]
    heads = {
        "student": ViewHead(inputs["student_hidden"], inputs["student_head"]),
        # The privileged student is the student on another prompt: the same head.
        "priv_student": ViewHead(inputs["priv_student_hidden"], inputs["student_head"]),
        "teacher": ViewHead(inputs["teacher_hidden"], inputs["teacher_head"]),
    }
    return chunked_objective_loss(
        objective, heads, inputs["token_ids"], weights, chunk_rows=chunk_rows
    ).loss


def _peak_rss_bytes() -> int:
    try:
        return 1024 * int(
            re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)
        )
    except (OSError, AttributeError):
        return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(spec_path: str) -> None:
    """One repetition of one path in this (fresh) process; writes its measurements as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    config = Config(**spec["config"])
    inputs = make_inputs(config)
    inputs["student_hidden"].requires_grad_(True)
    inputs["student_head"].requires_grad_(True)
    objective = DOPD(DOPDConfig())
    reset = _reset_peak_rss()
    baseline = _peak_rss_bytes()  # after the inputs: only what the path allocates counts
    start = time.perf_counter()
    if spec["path"] == "naive":
        loss = naive_loss(inputs, objective)
    else:
        loss = efficient_loss(inputs, objective, config.chunk_rows)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes() - baseline
    if spec.get("save"):
        torch.save(
            {
                "loss": loss.detach(),
                "grad_hidden": inputs["student_hidden"].grad,
                "grad_head": inputs["student_head"].grad,
            },
            spec["save"],
        )
    result = {"seconds": seconds, "peak_bytes": peak, "peak_reset": reset, "loss": loss.item()}
    Path(spec["result"]).write_text(json.dumps(result))


def _run_worker(path: str, config: Config, directory: Path, repetition: int, save: bool) -> dict:
    spec = {
        "path": path,
        "config": asdict(config),
        "result": str(directory / f"{path}-{repetition}.json"),
        "save": str(directory / f"{path}.pt") if save else None,
    }
    spec_path = directory / f"{path}-{repetition}.spec.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], check=True)
    return json.loads(Path(spec["result"]).read_text())


def _available_bytes() -> int:
    match = re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())
    return 1024 * int(match.group(1))


def _errors(directory: Path) -> dict[str, dict[str, float]]:
    """Max abs difference between the paths' loss and gradients, and the naive values' scale."""
    naive, efficient = (
        torch.load(directory / f"{path}.pt", weights_only=True) for path in ("naive", "efficient")
    )
    return {
        "max_abs_err_by_output": {
            key: (naive[key] - efficient[key]).abs().max().item() for key in naive
        },
        "naive_max_abs_by_output": {key: naive[key].abs().max().item() for key in naive},
    }


def _input_bytes(config: Config) -> int:
    return 4 * (2 * config.vocab * config.hidden + 3 * config.rows * config.hidden)


def _fitting_paths(config: Config) -> list[str]:
    """The paths whose estimated peak fits in the memory available now (a shared machine)."""
    logits = {"naive": config.rows * config.vocab, "efficient": config.chunk_rows * config.vocab}
    paths = []
    for path in ("naive", "efficient"):
        bytes_per_logit = NAIVE_BYTES_PER_LOGIT if path == "naive" else EFFICIENT_BYTES_PER_LOGIT
        # + the inputs and the head's gradient
        total = (
            bytes_per_logit * logits[path] + _input_bytes(config) + 4 * config.vocab * config.hidden
        )
        if total < 0.9 * _available_bytes():
            paths.append(path)
        else:
            print(
                f"  note: skipping the {path} path: it needs ~{total / 2**30:.1f} GiB and "
                f"{_available_bytes() / 2**30:.1f} GiB are available",
                flush=True,
            )
    return paths


def bench_config(config: Config, repeats: int) -> dict:
    """Alternate naive / efficient repetitions; a configuration whose naive path cannot fit runs
    the efficient path once (no ratio to measure)."""
    paths = _fitting_paths(config)
    both = paths == ["naive", "efficient"]
    results = {path: [] for path in paths}
    with tempfile.TemporaryDirectory(prefix="dopd-bench-") as tmp:
        for repetition in range(repeats if both else 1):
            for path in paths:
                results[path].append(
                    _run_worker(path, config, Path(tmp), repetition, save=both and repetition == 0)
                )
        errors = _errors(Path(tmp)) if both else {}
    summary = {"config": asdict(config), "naive": {"skipped": "does not fit in memory"}}
    for path, runs in results.items():
        summary[path] = {
            "seconds_median": statistics.median(run["seconds"] for run in runs),
            "seconds": [run["seconds"] for run in runs],
            "peak_bytes": max(run["peak_bytes"] for run in runs),
            "peak_reset": all(run["peak_reset"] for run in runs),
            "loss": runs[0]["loss"],
        }
    if both:
        summary["peak_memory_ratio"] = (
            summary["efficient"]["peak_bytes"] / summary["naive"]["peak_bytes"]
        )
        summary["time_ratio"] = (
            summary["efficient"]["seconds_median"] / summary["naive"]["seconds_median"]
        )
        summary["max_abs_err"] = max(errors["max_abs_err_by_output"].values())
        summary.update(errors)
    return summary


def _table(rows: list[dict]) -> str:
    header = (
        f"{'V':>7} {'d':>5} {'N':>6} {'chunk':>5} | "
        f"{'naive GiB':>9} {'eff GiB':>8} {'mem ratio':>9} | "
        f"{'naive s':>8} {'eff s':>8} {'time ratio':>10} | {'max abs err':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        c = row["config"]
        naive, efficient = row["naive"] if "peak_bytes" in row["naive"] else None, row["efficient"]

        def cell(value, fmt):
            return format(value, fmt) if value is not None else "skipped"

        lines.append(
            f"{c['vocab']:>7} {c['hidden']:>5} {c['rows']:>6} {c['chunk_rows']:>5} | "
            f"{cell(naive and naive['peak_bytes'] / 2**30, '9.2f'):>9} "
            f"{efficient['peak_bytes'] / 2**30:>8.2f} "
            f"{cell(row.get('peak_memory_ratio'), '9.3f'):>9} | "
            f"{cell(naive and naive['seconds_median'], '8.1f'):>8} "
            f"{efficient['seconds_median']:>8.1f} {cell(row.get('time_ratio'), '10.3f'):>10} | "
            f"{cell(row.get('max_abs_err'), '11.2e'):>11}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small vocabulary and rows: a smoke run"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per path (median time)")
    parser.add_argument(
        "--chunk-rows", type=int, default=256, help="rows per chunk of the efficient path"
    )
    parser.add_argument("--vocab", type=int, help="override the vocabulary size")
    parser.add_argument("--hidden", type=int, nargs="+", help="override the hidden sizes")
    parser.add_argument(
        "--rows", type=int, nargs="+", help="override the token-row counts (multiples of 1024)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    vocab = args.vocab or (8192 if args.quick else 151936)
    hidden_sizes = args.hidden or ([256] if args.quick else [1024, 2048])
    # 2048 rows is the largest power of two whose naive path fits in 24 GiB at V = 151,936 (8.3
    # floats per logit: ~19 GiB at 4096 rows); larger counts run the efficient path alone.
    row_counts = args.rows or ([2048] if args.quick else [2048, 4096, 8192])
    configs = [Config(vocab, d, n, args.chunk_rows) for d in hidden_sizes for n in row_counts]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}, {_available_bytes() / 2**30:.1f} GiB available",
        flush=True,
    )
    rows = []
    for config in configs:
        print(f"running {config} ...", flush=True)
        rows.append(bench_config(config, args.repeats))
    print(_table(rows))
    measured = [row for row in rows if "peak_memory_ratio" in row]
    headline = {
        "peak_memory_ratio": max((row["peak_memory_ratio"] for row in measured), default=None),
        "time_ratio": max((row["time_ratio"] for row in measured), default=None),
        "max_abs_err": max((row["max_abs_err"] for row in measured), default=None),
    }
    print(
        "worst over configurations with both paths: "
        + ", ".join(
            f"{k} = {v:.4g}" if v is not None else f"{k} = n/a" for k, v in headline.items()
        )
    )
    if args.json:
        machine = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_end": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        args.json.write_text(
            json.dumps({**headline, "machine": machine, "configurations": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
