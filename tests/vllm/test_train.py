"""``dopd train`` with vLLM rollouts end to end, as a user runs it (subprocesses of this
interpreter): colocate mode, a resumed colocate run equal to an uninterrupted one, and server mode
against a ``dopd vllm-serve`` process. Each run logs the training-inference mismatch."""

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from dopd.training.backends import wait_for_server
from tests.vllm.conftest import CONFIG, ROOT

STEPS = ("--set", "optim.max_steps=3", "--set", "loop.save_every=1", "--set", "loop.eval_every=0")


def dopd(*args: str, check: bool = True, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dopd.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if popen:
        return subprocess.Popen(command, cwd=ROOT, env=env, **popen)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steps_only(records: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_second"))}
        for r in records
        if "loss" in r
    ]


def check_mismatch_logged(records: list[dict], steps: int) -> None:
    """Every step logs the mismatch and a weight sync: tiny, because the engine holds the same
    float32 weights as the trainer (after every reload)."""
    trained = [r for r in records if "loss" in r]
    assert len(trained) == steps
    for record in trained:
        assert 0 <= record["mismatch/abs_log_prob_diff"] < 1e-4
        assert abs(record["mismatch/kl"]) < 1e-6
        assert record["time/weight_sync"] > 0


def test_colocate_training_runs_and_resumes_exactly(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    dopd("train", "--config", str(CONFIG), "--set", f"output_dir={full}", *STEPS)
    check_mismatch_logged(metrics(full), 3)
    dopd(
        "train",
        "--config",
        str(CONFIG),
        "--set",
        f"output_dir={split}",
        *STEPS,
        "--stop-after",
        "1",
    )
    dopd("train", "--config", str(CONFIG), "--set", f"output_dir={split}", *STEPS, "--resume")
    # Same seeds, reloaded weights: the resumed run samples the same completions, so its steps
    # log the same figures as the uninterrupted run's.
    assert steps_only(metrics(split)) == steps_only(metrics(full))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    process = dopd(
        "vllm-serve",
        "--config",
        str(CONFIG),
        "--set",
        f"rollout.vllm_server_port={port}",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_server(f"http://127.0.0.1:{port}", 240)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_server_mode_trains_and_refuses_a_malformed_request(tmp_path, server):
    run = tmp_path / "run"
    dopd(
        "train",
        "--config",
        str(CONFIG),
        "--set",
        f"output_dir={run}",
        *STEPS,
        "--set",
        "rollout.vllm_mode=server",
        "--set",
        f"rollout.vllm_server_port={server}",
    )
    check_mismatch_logged(metrics(run), 3)
    request = urllib.request.Request(
        f"http://127.0.0.1:{server}/generate", data=b'{"prompts": [[1]]}', method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert "TypeError" in json.loads(refused.value.read())["error"]


def test_server_mode_without_a_server_fails_with_one_line(tmp_path):
    result = dopd(
        "train",
        "--config",
        str(CONFIG),
        "--set",
        f"output_dir={tmp_path / 'run'}",
        "--set",
        "rollout.vllm_mode=server",
        "--set",
        f"rollout.vllm_server_port={free_port()}",
        "--set",
        "rollout.vllm_server_timeout=2",
        check=False,
    )
    assert result.returncode != 0
    assert "no vLLM server answered" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_lora_student_keeps_the_engine_in_sync(tmp_path):
    # LoRA's B starts at zero: unless each sync carries the adapted layers (merged), the engine
    # would sample from the base model while the trainer scores the adapted one, and the mismatch
    # would grow as the adapters move (lr 1e-2 moves them once the warm-up starts).
    run = tmp_path / "lora"
    lora = ("--set", "peft.enabled=true", "--set", "peft.r=4", "--set", "optim.lr=1e-2")
    dopd("train", "--config", str(CONFIG), "--set", f"output_dir={run}", *STEPS, *lora)
    check_mismatch_logged(metrics(run), 3)
    from safetensors.torch import load_file

    merged = load_file(str(run / "model" / "model.safetensors"))
    base = load_file(str(run / "checkpoints" / "step-000003" / "student.safetensors"))
    adapted = [k for k in base if "lora_B" in k]
    assert adapted and any(base[k].abs().max() > 0 for k in adapted)
    assert not any("lora" in k for k in merged)
