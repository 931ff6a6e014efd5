"""The FSDP2 launch through accelerate, on GPUs: train, stop and resume, compare with DDP.

    python bench/gpu_fsdp.py                       # every visible GPU (1 is enough), ~3 min
    python bench/gpu_fsdp.py --json /tmp/x.json    # else $OUT/gpu-fsdp.json, else docs/

accelerate shards only on GPUs (on a CPU its FSDP config starts DDP, which dopd refuses), so this
is the check of what the CPU tests cannot reach: accelerate's FSDP2 ``prepare`` of the student and
of the frozen teacher, the trainer's chunked loss and synced generation under it, the sharded
checkpoint and the gathered export. ``configs/tiny.yaml`` (4 steps, a checkpoint every 2, one
prompt per GPU and step times 8) runs three times through ``accelerate launch -m dopd.cli train``:

* ``fsdp2``: ``configs/accelerate/fsdp2.yaml``, uninterrupted;
* ``fsdp2_resumed``: the same, ``--stop-after 2``, then ``--resume``;
* ``ddp``: ``configs/accelerate/ddp.yaml``.

Reported: each run's exit status and stderr tail, whether the resumed run's metrics equal the
uninterrupted one's (the continuation is deterministic), the largest relative difference per
metric between FSDP2 and DDP (fp32 rounding expected), the checkpoint's files, and whether the
exported model loads with ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("loss", "grad_norm", "student_entropy", "completion_length")


def launch(config: str, processes: int, output_dir: Path, *extra: str) -> dict:
    """One ``accelerate launch ... dopd.cli train``; its exit status and the end of its stderr."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "configs" / "accelerate" / config),
        "--num_processes", str(processes),
        "-m", "dopd.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--set", f"output_dir={output_dir}", "--set", "optim.max_steps=4",
        "--set", "loop.save_every=2", "--set", "data.eval=null", "--set", "loop.eval_every=0",
        "--set", f"rollout.prompts_per_step={8 * processes}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return {"returncode": result.returncode, "stderr_tail": result.stderr[-2000:]}


def metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _values(records: list[dict]) -> list[tuple]:
    """The compared metrics of every step (times and rates left out: they differ run to run)."""
    return [tuple(record.get(key) for key in ("step", *COMPARED)) for record in records]


def largest_differences(a: list[dict], b: list[dict]) -> dict[str, float | None]:
    """Per compared metric, the largest ``|a - b| / max(|b|, 1e-12)`` over steps."""
    if len(a) != len(b) or not a:
        return {key: None for key in COMPARED}
    return {
        key: max(abs(x[key] - y[key]) / max(abs(y[key]), 1e-12) for x, y in zip(a, b))
        for key in COMPARED
    }


def export_loads(folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    except Exception as error:  # noqa: BLE001 - reported, the rest of the report still counts
        return f"{type(error).__name__}: {error}"[:500]
    return f"ok ({model.dtype}, {sum(p.numel() for p in model.parameters()):,} parameters)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    processes = torch.cuda.device_count()
    if processes == 0:
        raise SystemExit("no CUDA device: accelerate shards only on GPUs")
    out = args.json or (
        Path(os.environ["OUT"]) / "gpu-fsdp.json"
        if os.environ.get("OUT")
        else ROOT / "docs" / "gpu-fsdp.json"
    )
    report: dict = {"gpus": processes, "gpu": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as folder:
        runs = {name: Path(folder) / name for name in ("fsdp2", "fsdp2_resumed", "ddp")}
        report["fsdp2"] = launch("fsdp2.yaml", processes, runs["fsdp2"])
        first = launch("fsdp2.yaml", processes, runs["fsdp2_resumed"], "--stop-after", "2")
        report["fsdp2_resumed"] = {
            "first": first,
            "resume": launch("fsdp2.yaml", processes, runs["fsdp2_resumed"], "--resume"),
        }
        report["ddp"] = launch("ddp.yaml", processes, runs["ddp"])
        fsdp, resumed, ddp = (metrics(runs[name]) for name in runs)
        report["resumed_equals_uninterrupted"] = bool(fsdp) and _values(resumed) == _values(fsdp)
        report["fsdp2_vs_ddp_relative"] = largest_differences(fsdp, ddp)
        checkpoint = runs["fsdp2"] / "checkpoints" / "step-000002"
        report["checkpoint_files"] = (
            sorted(p.name for p in checkpoint.iterdir()) if checkpoint.is_dir() else []
        )
        report["export"] = export_loads(runs["fsdp2"] / "model")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
