"""The step and loss benches on one GPU, Qwen3-0.6B-shaped random-init models in bf16, one JSON.

    python bench/gpu.py                                    # one H100 80 GB, <= 9 min, no downloads
    python bench/gpu.py --smoke --json /tmp/gpu-smoke.json # the same code paths shrunk, on CPU

Writes ``$OUT/bench-gpu.json`` when ``OUT`` is set, else ``--json`` (default
``docs/bench-gpu.json``); the file is rewritten after every section, so a run cut short still
leaves what it measured. Each section runs in its own subprocess under its own time limit
(``--step-seconds``, ``--rollout-seconds``, ``--loss-seconds``; 240 + 120 + 150 s by default, so
the whole run stays under 9 minutes with model construction and CUDA start-up):

* ``step`` (``bench/step.py`` on real shapes): one optimizer step of vanilla OPD, Priv.T->S and
  DOPD, a student shaped like Qwen3-0.6B (d 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128,
  MLP 3072, tied embeddings, V = 151,936) and a teacher shaped like Qwen3-1.7B (d 2048, MLP 6144);
  the student trains in accelerate's bf16 mixed precision (fp32 master weights, AdamW in fp32),
  the frozen teacher and privileged views are cast to bf16. Median seconds per part over
  ``--steps`` steps after one warm-up, and peak GPU memory.
* ``rollout``: DOPD's step as in ``step`` with ``rollout.backend`` hf and then vllm (colocate,
  ``vllm_gpu_memory_utilization`` 0.3): generation time, engine weight-sync time, the mismatch
  metrics, ``vllm_over_hf_generation``; recorded as skipped where vLLM does not import.
* ``loss`` (``bench/loss.py``'s inputs and paths): naive three-full-logits DOPD loss vs
  ``chunked_objective_loss`` at V = 151,936, d = 1024, bf16 hidden states and heads; median time
  of forward+backward and peak GPU memory above the inputs, naive skipped where it cannot fit.

Nothing is downloaded: the models are built from Qwen3 configs and the tokenizer is dopd's
character tokenizer widened with extra code points to Qwen3's vocabulary size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "src")]  # dopd need not be installed on the GPU box
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402  (after the path and offline setup above)

VOCAB = 151_936
QWEN3_0_6B = {
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "tie_word_embeddings": True,
}
QWEN3_1_7B = {**QWEN3_0_6B, "hidden_size": 2048, "intermediate_size": 6144}
DATA_CHARACTERS = " ()*+,-./0123456789=abcdefghijklmnopqrstuvwxyz\n"
STEP_PARTS = ("time/generation", "time/scoring", "time/forward_backward", "time/step")
ENGINE_PARTS = ("time/weight_sync", "mismatch/abs_log_prob_diff", "mismatch/kl")
OBJECTIVES = ("vanilla_opd", "priv_teacher_opd", "dopd")


def settings(smoke: bool) -> dict:
    """Shapes and sizes of both sections; ``smoke`` keeps every code path at toy size (CPU)."""
    if smoke:
        student = {
            **QWEN3_0_6B,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,  # vLLM's CPU attention needs >= 32
            "intermediate_size": 128,
        }
        # The step keeps Qwen3's vocabulary (the widened tokenizer is a code path worth checking).
        return {
            "device": "cpu",
            "vocab": VOCAB,
            "loss_vocab": 2048,
            "student": student,
            "teacher": {**student, "hidden_size": 96},
            "prompts": 4,
            "generations": 2,
            "length": 8,
            "micro_batch_size": 4,
            "steps": 1,
            "loss_hidden": 64,
            "loss_rows": [1024, 2048],
            "chunk_rows_grid": [256],
            "repeats": 1,
            "vllm_gpu_memory_utilization": 0.3,
        }
    return {
        "device": "cuda",
        "vocab": VOCAB,
        "loss_vocab": VOCAB,
        "student": QWEN3_0_6B,
        "teacher": QWEN3_1_7B,
        "prompts": 16,
        "generations": 4,
        "length": 128,
        "micro_batch_size": 16,
        "steps": 5,
        "loss_hidden": 1024,
        "loss_rows": [2048, 4096, 8192, 16384],
        "chunk_rows_grid": [1024, 4096],
        "repeats": 3,
        "vllm_gpu_memory_utilization": 0.3,
    }


def characters(vocab: int) -> str:
    """The data's characters, then other code points (no surrogates) up to ``vocab`` tokens."""
    from dopd.modeling.tiny import SPECIAL_TOKENS

    alphabet, code = list(DATA_CHARACTERS), 0x100
    while len(alphabet) < vocab - len(SPECIAL_TOKENS):
        if not 0xD800 <= code <= 0xDFFF:
            alphabet.append(chr(code))
        code += 1
    return "".join(alphabet)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> int:
    """Start a peak-memory window; returns the bytes allocated now (the baseline)."""
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak(device: str, baseline: int = 0) -> float | None:
    return (torch.cuda.max_memory_allocated() - baseline) / 2**30 if device == "cuda" else None


# -- step section -------------------------------------------------------------------------------
def step_config(objective: str, setup: dict, output_dir: Path, rollout: dict | None = None):
    """The step section's run config; ``rollout`` adds keys of the rollout section (backend)."""
    from dopd.config import TrainConfig, from_dict

    return from_dict(
        TrainConfig,
        {
            "output_dir": str(output_dir),
            "seed": 0,
            "student": {"tiny": setup["student"]},
            "teacher": {"tiny": setup["teacher"]},
            "tokenizer": {"characters": characters(setup["vocab"])},
            "data": {"train": str(ROOT / "configs" / "data" / "tiny.jsonl")},
            "objective": {"name": objective},
            "rollout": {
                "prompts_per_step": setup["prompts"],
                "num_generations": setup["generations"],
                "max_completion_length": setup["length"],
                **(rollout or {}),
            },
            "optim": {
                "lr": 1e-5,
                "max_steps": setup["steps"] + 1,
                "micro_batch_size": setup["micro_batch_size"],
            },
            "loop": {"save_every": 0, "mixed_precision": "bf16"},
        },
    )


def time_step(objective: str, setup: dict, rollout: dict | None = None) -> dict:
    """Median seconds per part over the timed steps (after one warm-up), peak memory, tokens;
    with the engine's weight-sync time and the mismatch metrics where the backend records them."""
    from dopd.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        trainer = Trainer(step_config(objective, setup, Path(folder), rollout))
        for name, model in trainer.models.items():  # frozen views: bf16 weights, no optimizer
            if name != "priv_student" or trainer.config.views.priv_student_weights != "live":
                model.to(torch.bfloat16)
        build = time.perf_counter() - start
        records = []
        baseline = _reset_peak(setup["device"])
        for step in range(setup["steps"] + 1):
            record = trainer.train_step()
            trainer.step += 1
            if step:
                records.append(record)
        parts = [part for part in (*STEP_PARTS, *ENGINE_PARTS) if part in records[0]]
        result = {part: statistics.median(r[part] for r in records) for part in parts}
        result.update(
            {
                "completion_tokens": statistics.median(r["completion_tokens"] for r in records),
                "build_seconds": build,
                "peak_gib_above_models": _peak(setup["device"], baseline),
                "peak_gib": _peak(setup["device"]),
            }
        )
    return result


def run_step_section(setup: dict, results: dict) -> Iterator[None]:
    for objective in OBJECTIVES:
        results[objective] = _guarded(time_step, objective, setup)
        yield
    step = {name: results[name].get("time/step") for name in OBJECTIVES}
    if all(step.values()):
        results["dopd_over_vanilla"] = step["dopd"] / step["vanilla_opd"]
        results["dopd_over_priv_teacher"] = step["dopd"] / step["priv_teacher_opd"]


# -- rollout section ----------------------------------------------------------------------------
def run_rollout_section(setup: dict, results: dict) -> Iterator[None]:
    """DOPD's step with ``rollout.backend`` hf and vllm (colocate), the same shapes as ``step``."""
    try:
        import vllm  # noqa: F401 - only asks whether the backend can run here
    except ImportError as error:
        results["skipped"] = f"vLLM is not importable here ({error}); install dopd[vllm]"
        yield
        return
    backends = {
        "hf": {"backend": "hf"},
        "vllm_colocate": {
            "backend": "vllm",
            "vllm_mode": "colocate",
            "vllm_gpu_memory_utilization": setup["vllm_gpu_memory_utilization"],
            # The tiny models have 512 positions; the prompts here are far shorter.
            "vllm_max_model_len": 512,
        },
    }
    for name, rollout in backends.items():
        results[name] = _guarded(time_step, "dopd", setup, rollout)
        yield
    generation = {name: results[name].get("time/generation") for name in backends}
    if all(generation.values()):
        results["vllm_over_hf_generation"] = generation["vllm_colocate"] / generation["hf"]
        results["vllm_over_hf_step"] = (
            results["vllm_colocate"]["time/step"] / results["hf"]["time/step"]
        )


# -- loss section -------------------------------------------------------------------------------
def loss_inputs(config, device: str) -> dict[str, torch.Tensor]:
    """``bench/loss.py``'s inputs, moved to ``device`` in bf16 (token ids stay long)."""
    from loss import make_inputs

    inputs = make_inputs(config)
    return {
        k: v.to(device) if k == "token_ids" else v.to(device, torch.bfloat16)
        for k, v in inputs.items()
    }


def time_loss_path(path: str, inputs: dict, chunk_rows: int, device: str, keep_grads: bool) -> dict:
    """One forward+backward of ``naive`` or ``chunked``: seconds, peak memory above the inputs."""
    from dopd.objectives.dopd import DOPD, DOPDConfig
    from loss import efficient_loss, naive_loss

    for key in ("student_hidden", "student_head"):
        inputs[key].grad = None
        inputs[key].requires_grad_(True)
    objective = DOPD(DOPDConfig())
    baseline = _reset_peak(device)
    start = time.perf_counter()
    with torch.device(device):  # bench/loss.py makes its masks with the default device
        loss = (
            naive_loss(inputs, objective)
            if path == "naive"
            else efficient_loss(inputs, objective, chunk_rows)
        )
        loss.backward()
    _sync(device)
    run = {
        "seconds": time.perf_counter() - start,
        "peak_gib": _peak(device, baseline),
        "loss": loss.item(),
    }
    if keep_grads:
        run["grads"] = [inputs[key].grad.float() for key in ("student_hidden", "student_head")]
    return run


def naive_fits(rows: int, vocab: int, device: str) -> bool:
    """Whether three full logits fit: ~36 bytes per N x V logit (bench/loss.py's measured float32
    peak, kept although bf16 needs less) against the free GPU memory."""
    if device != "cuda":
        return True
    return 36 * rows * vocab < 0.9 * torch.cuda.mem_get_info()[0]


def bench_loss_config(config, setup: dict) -> dict:
    """Alternate the paths, one untimed round first (its loss and gradients are compared)."""
    device = setup["device"]
    inputs = loss_inputs(config, device)
    paths = {f"chunked_{size}": ("chunked", size) for size in setup["chunk_rows_grid"]}
    if naive_fits(config.rows, config.vocab, device):
        paths = {"naive": ("naive", 0), **paths}
    first, timed, failed = {}, {label: [] for label in paths}, {}
    for repetition in range(setup["repeats"] + 1):
        for label, (path, chunk_rows) in paths.items():
            if label in failed:
                continue
            try:
                run = time_loss_path(path, inputs, chunk_rows, device, keep_grads=not repetition)
            except torch.OutOfMemoryError:
                failed[label] = "out of memory"
                torch.cuda.empty_cache()
                continue
            if repetition:
                timed[label].append(run)
            else:
                first[label] = run
    summary = {
        "config": {
            "vocab": config.vocab,
            "hidden": config.hidden,
            "rows": config.rows,
            "dtype": "bfloat16",
        }
    }
    summary["naive"] = {"skipped": "does not fit in GPU memory"}
    for label, runs in timed.items():
        if not runs:
            summary[label] = {"skipped": failed.get(label, "no timed run")}
            continue
        summary[label] = {
            "seconds_median": statistics.median(r["seconds"] for r in runs),
            "peak_gib": max(r["peak_gib"] for r in runs) if device == "cuda" else None,
            "loss": runs[0]["loss"],
        }
    for label in paths:
        if (
            label != "naive"
            and "seconds_median" in summary[label]
            and "seconds_median" in summary["naive"]
        ):
            summary[label].update(_against_naive(summary, first, label))
    return summary


def _against_naive(summary: dict, first: dict, label: str) -> dict:
    """Time and memory ratios of a chunked path to the naive one, and their differences (bf16)."""
    chunked, naive = summary[label], summary["naive"]
    grads = zip(first[label]["grads"], first["naive"]["grads"])
    return {
        "time_ratio": chunked["seconds_median"] / naive["seconds_median"],
        "peak_memory_ratio": chunked["peak_gib"] / naive["peak_gib"] if naive["peak_gib"] else None,
        "loss_abs_err": abs(first[label]["loss"] - first["naive"]["loss"]),
        "grad_max_abs_err": max((a - b).abs().max().item() for a, b in grads),
        "grad_max_abs": max(g.abs().max().item() for g in first["naive"]["grads"]),
    }


def run_loss_section(setup: dict, results: dict) -> Iterator[None]:
    from loss import Config

    results["configurations"] = []
    for rows in setup["loss_rows"]:
        config = Config(
            setup["loss_vocab"], setup["loss_hidden"], rows, chunk_rows=setup["chunk_rows_grid"][0]
        )
        results["configurations"].append(_guarded(bench_loss_config, config, setup))
        yield


def _guarded(function, *args) -> dict:
    """``function(*args)``, or the error it raised: one failed measurement must not cost the rest
    of a scarce GPU run."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001 - recorded in the JSON, the section goes on
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(error).__name__}: {error}"[:2000]}


SECTIONS = {"step": run_step_section, "rollout": run_rollout_section, "loss": run_loss_section}


# -- driver -------------------------------------------------------------------------------------
def run_section(name: str, setup: dict, out: Path) -> None:
    """Run one section in this process, rewriting ``out`` after each measurement."""
    results: dict = {}
    for _ in SECTIONS[name](setup, results):
        out.write_text(json.dumps(results, indent=2))
    out.write_text(json.dumps(results, indent=2))


def machine(device: str) -> dict:
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30})
    return info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes on CPU: checks the script, measures nothing"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="output (default $OUT/bench-gpu.json, else docs/bench-gpu.json)",
    )
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument(
        "--step-seconds", type=int, default=240, help="time limit of the step section"
    )
    parser.add_argument(
        "--rollout-seconds", type=int, default=120, help="time limit of the rollout section"
    )
    parser.add_argument(
        "--loss-seconds", type=int, default=150, help="time limit of the loss section"
    )
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--section-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup = settings(args.smoke)
    if args.section:
        return run_section(args.section, setup, args.section_out)
    if setup["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --smoke for the CPU check")
    out = args.json or (
        Path(os.environ["OUT"]) / "bench-gpu.json"
        if os.environ.get("OUT")
        else ROOT / "docs" / "bench-gpu.json"
    )
    report = {
        "command": " ".join(["python", "bench/gpu.py", *sys.argv[1:]]),
        "smoke": args.smoke,
        "machine": machine(setup["device"]),
        "settings": setup,
    }
    limits = {
        "step": args.step_seconds,
        "rollout": args.rollout_seconds,
        "loss": args.loss_seconds,
    }
    with tempfile.TemporaryDirectory() as folder:
        for name in args.sections:
            section_out = Path(folder) / f"{name}.json"
            start = time.perf_counter()
            command = [
                sys.executable,
                __file__,
                "--section",
                name,
                "--section-out",
                str(section_out),
            ] + (["--smoke"] if args.smoke else [])
            errors = Path(folder) / f"{name}.stderr"
            try:
                with errors.open("w") as stderr:
                    code = subprocess.run(
                        command, check=False, timeout=limits[name], stderr=stderr
                    ).returncode
                status = "ok" if code == 0 else f"failed with exit code {code}"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limits[name]} s (partial results kept)"
            report[name] = json.loads(section_out.read_text()) if section_out.exists() else {}
            report[name]["status"], report[name]["seconds"] = status, time.perf_counter() - start
            if status != "ok":  # the reason travels with the JSON
                report[name]["stderr_tail"] = errors.read_text()[-4000:]
                print(report[name]["stderr_tail"], file=sys.stderr)
            print(f"{name}: {status} in {report[name]['seconds']:.0f} s", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
