"""Kill ``dopd train`` with SIGKILL at random points, resume it until it finishes, and check that
its final weights (and metrics) are bit-identical to an uninterrupted run's. CPU, deterministic.

    python3 scripts/stress_resume.py --kills 50  # 10 rounds of 5 kills, ~8 minutes on 2 cores
    python3 scripts/stress_resume.py --kills 8 --seed 3 --workdir /tmp/stress --keep

Each round trains a tiny random-init model (configs/tiny.yaml, a checkpoint every step) in a
fresh output_dir. Kill points, from a seeded RNG, rotate over three kinds:

  startup  a random moment after launch, up to the first new checkpoint: imports, resume,
           metrics truncation, the first step
  step     once 1-2 more checkpoints are published, a random moment within the next step
  save     as soon as a checkpoint's .tmp- folder appears: in the middle of writing it

After every kill every published ``checkpoints/step-*`` must pass ``verify_checkpoint`` (the
rename is atomic, so a kill can only leave a ``.tmp-`` folder behind). tests/test_checkpoint.py
loads this file and runs one round of 5 kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG, DATA = ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "data" / "tiny.jsonl"
MODES = ("startup", "step", "save")
MAX_STEPS = 12  # 5 kills advance a run by at most ~9 steps, so it cannot finish before the 5th


@dataclass
class Timing:
    """From the uninterrupted run: seconds from launch to the first checkpoint, and per step."""

    startup: float
    step: float


@dataclass
class Kill:
    mode: str
    seconds: float  # after launch
    resumed_from: int  # the newest published checkpoint when the run was launched
    reached: int  # the newest published checkpoint after the kill
    leftovers: list[str]  # .tmp- folders or files left behind (resume deletes them)
    mid_write: bool  # the killed process left a .tmp- of its own: it died while writing
    torn_metrics: bool  # metrics.jsonl ends in the middle of a line


def train_command(output_dir: Path, max_steps: int = MAX_STEPS) -> list[str]:
    overrides = [
        f"output_dir={output_dir}",
        f"data.train={DATA}",
        "data.eval=null",
        "loop.eval_every=0",
        f"optim.max_steps={max_steps}",
        "optim.warmup_steps=2",
        "loop.save_every=1",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=2",
        "rollout.max_completion_length=8",
    ]
    command = [sys.executable, "-m", "dopd.cli", "train", "--config", str(CONFIG), "--resume"]
    return command + [item for override in overrides for item in ("--set", override)]


@contextmanager
def launched(output_dir: Path, log: Path, max_steps: int) -> Iterator[subprocess.Popen]:
    """``dopd train --resume`` in the background, output to ``log``; killed if still alive at
    exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        process = subprocess.Popen(
            train_command(output_dir, max_steps),
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def published(output_dir: Path) -> list[int]:
    """Steps of the published (renamed into place) checkpoints, ascending."""
    root = output_dir / "checkpoints"
    names = os.listdir(root) if root.is_dir() else []
    return sorted(int(name[5:]) for name in names if name.startswith("step-"))


def saving(output_dir: Path, pid: int) -> bool:
    """Whether process ``pid`` is writing a checkpoint (not: a killed one's leftover exists)."""
    root = output_dir / "checkpoints"
    return root.is_dir() and any(
        name.startswith(".tmp-step-") and name.endswith(f"-{pid}") for name in os.listdir(root)
    )


def wait_for(
    process: subprocess.Popen, condition, timeout: float = 120.0, poll: float = 0.002
) -> bool:
    """Poll until ``condition()``; False if the process exits first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if condition():
            return True
        if time.monotonic() > deadline:
            raise TimeoutError(f"no progress in {timeout:.0f} s")
        time.sleep(poll)
    return False


def finish(process: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    if process.wait(timeout=timeout) != 0:
        raise RuntimeError(
            f"dopd train exited with {process.returncode}; log {log}:\n{log.read_text()[-3000:]}"
        )


def reference_run(workdir: Path, max_steps: int = MAX_STEPS) -> Timing:
    """Train ``workdir/reference`` without interruption; time its start-up and steps."""
    output_dir, log = workdir / "reference", workdir / "logs" / "reference.log"
    shutil.rmtree(output_dir, ignore_errors=True)
    start = time.monotonic()
    with launched(output_dir, log, max_steps) as process:
        wait_for(process, lambda: published(output_dir), poll=0.01)
        first = time.monotonic()
        finish(process, log)
    return Timing(startup=first - start, step=(time.monotonic() - first) / max(max_steps - 1, 1))


def kill_somewhere(
    process: subprocess.Popen, output_dir: Path, mode: str, rng: random.Random, timing: Timing
) -> float | None:
    """SIGKILL ``process`` at a random point of kind ``mode``; the seconds after launch, or None
    if it finished first."""
    start = time.monotonic()
    if mode == "startup":  # a random moment, but no later than the first new checkpoint
        delay, before = rng.uniform(0.0, timing.startup), len(published(output_dir))
        alive = wait_for(
            process, lambda: time.monotonic() - start > delay or len(published(output_dir)) > before
        )
    elif mode == "step":
        target = len(published(output_dir)) + rng.randint(1, 2)
        alive = wait_for(process, lambda: len(published(output_dir)) >= target, poll=0.005)
        reached, delay = time.monotonic(), rng.uniform(0.0, timing.step)
        alive = alive and wait_for(
            process,
            lambda: time.monotonic() - reached > delay or len(published(output_dir)) > target,
        )
    elif mode == "save":
        alive = wait_for(process, lambda: saving(output_dir, process.pid), poll=0.001)
        time.sleep(rng.uniform(0.0, 0.005))
    else:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
    if not alive or process.poll() is not None:
        return None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return time.monotonic() - start


def check_published(output_dir: Path) -> None:
    """Every published checkpoint must verify: a kill may only leave .tmp- leftovers."""
    from dopd.training.checkpoint_files import checkpoint_dir, verify_checkpoint

    for step in published(output_dir):
        if (reason := verify_checkpoint(checkpoint_dir(output_dir, step))) is not None:
            raise AssertionError(
                f"published checkpoint step-{step:06d} of {output_dir} is invalid: {reason}"
            )


def leftovers(output_dir: Path) -> list[str]:
    folders = [output_dir, output_dir / "checkpoints"]
    return sorted(
        str((folder / name).relative_to(output_dir))
        for folder in folders
        if folder.is_dir()
        for name in os.listdir(folder)
        if name.startswith(".tmp-")
    )


def torn(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")


def interrupted_run(
    output_dir: Path, kills: int, rng: random.Random, timing: Timing, max_steps: int = MAX_STEPS
) -> list[Kill]:
    """Launch with --resume and kill, ``kills`` times, then resume once more to the end."""
    shutil.rmtree(output_dir, ignore_errors=True)
    modes = [MODES[i % len(MODES)] for i in range(kills)]
    rng.shuffle(modes)
    records = []
    for number, mode in enumerate(modes):
        resumed_from = max(published(output_dir), default=0)
        log = output_dir.parent / "logs" / f"{output_dir.name}-{number:03d}.log"
        with launched(output_dir, log, max_steps) as process:
            seconds = kill_somewhere(process, output_dir, mode, rng, timing)
            if seconds is None:  # it finished before the kill point: nothing more to interrupt
                finish(process, log)
                break
        check_published(output_dir)
        reached = max(published(output_dir), default=0)
        left = leftovers(output_dir)
        mid_write = any(name.endswith(f"-{process.pid}") for name in left)
        records.append(
            Kill(
                mode,
                seconds,
                resumed_from,
                reached,
                left,
                mid_write,
                torn(output_dir / "metrics.jsonl"),
            )
        )
    log = output_dir.parent / "logs" / f"{output_dir.name}-final.log"
    with launched(output_dir, log, max_steps) as process:
        finish(process, log)
    return records


def compare_runs(reference: Path, run: Path) -> None:
    """Raise unless the two runs' final weights are bit-identical and their metrics equal."""
    import torch
    from safetensors.torch import load_file

    expected, actual = (
        load_file(str(reference / "model" / "model.safetensors")),
        load_file(str(run / "model" / "model.safetensors")),
    )
    if expected.keys() != actual.keys():
        raise AssertionError(
            f"{run}: weight names differ from {reference}: "
            f"{sorted(expected.keys() ^ actual.keys())}"
        )
    if differ := [name for name in expected if not torch.equal(expected[name], actual[name])]:
        raise AssertionError(
            f"{run}: {len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
        )
    if (a := _metrics(reference)) != (b := _metrics(run)):
        raise AssertionError(
            f"{run}: metrics.jsonl differs from the uninterrupted run ({len(a)} vs {len(b)} lines)"
        )


def _metrics(output_dir: Path) -> list[dict]:
    timed = ("time/", "tokens_per_second")
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(timed)} for line in lines
    ]


def summary(records: list[Kill]) -> dict:
    return {
        "kills": len(records),
        "by_mode": dict(Counter(r.mode for r in records)),
        "killed_mid_write": sum(r.mid_write for r in records),
        "left_tmp_leftovers": sum(bool(r.leftovers) for r in records),
        "left_a_torn_metrics_line": sum(r.torn_metrics for r in records),
        "made_no_progress": sum(r.reached == r.resumed_from for r in records),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="total SIGKILLs (default 50)")
    parser.add_argument(
        "--per-round", type=int, default=5, help="kills per run before it may finish (default 5)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="folder for the runs (default: a temporary one)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dopd-stress-"))
    rng, records, round_number, start = random.Random(args.seed), [], 0, time.monotonic()
    timing = reference_run(workdir)
    print(
        f"reference: start-up {timing.startup:.1f} s, {timing.step * 1000:.0f} ms/step", flush=True
    )
    while len(records) < args.kills:
        run = workdir / f"round-{round_number:03d}"
        kills = interrupted_run(run, min(args.per_round, args.kills - len(records)), rng, timing)
        if not kills:
            raise RuntimeError(f"{run} finished before its first kill; raise MAX_STEPS")
        compare_runs(workdir / "reference", run)
        records += kills
        print(
            f"round {round_number}: {len(kills)} kills, resumed run bit-identical: "
            f"{[asdict(k) for k in kills]}",
            flush=True,
        )
        shutil.rmtree(run, ignore_errors=True)
        round_number += 1
    print(json.dumps({**summary(records), "seconds": round(time.monotonic() - start)}, indent=1))
    if not (args.keep or args.workdir):
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
