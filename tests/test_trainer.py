"""The trainer end to end on tiny models: split invariance of one step, resume, 2 processes,
learning, every objective of the registry, and oracle routing from token roles."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dopd.config import load_config
from dopd.errors import ConfigError
from dopd.objectives.registry import OBJECTIVES, build_objective
from dopd.training.rollout import generate_rollouts, rollout_seeds
from dopd.training.step import make_micro_batches, run_step
from dopd.training.trainer import Trainer
from tests.tolerance import REORDERED, assert_close

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
DATA = str(ROOT / "configs" / "data" / "tiny.jsonl")


def tiny_config(output_dir: Path, *overrides: str):
    base = [f"output_dir={output_dir}", f"data.train={DATA}", "data.eval=null", "loop.eval_every=0"]
    return load_config(TINY, [*base, *overrides])


def step_rollouts(trainer: Trainer, step: int = 0):
    """This rank's rollouts of ``step`` and the per-view prompts of its rows."""
    rollout = trainer.config.rollout
    local = trainer.sampler.indices(step)
    policy = trainer.accelerator.unwrap_model(trainer.student)
    rollouts = generate_rollouts(
        policy,
        [trainer.prompts["plain"][i] for i in local],
        eos_token_id=trainer.tokenizer.eos_token_id,
        pad_token_id=trainer.tokenizer.pad_token_id,
        max_completion_length=rollout.max_completion_length,
        num_generations=rollout.num_generations,
        row_seeds=rollout_seeds(trainer.config.seed, step, local, rollout.num_generations),
    )
    rows = local[rollouts.prompt_index].tolist()
    prompts = {
        name: [trainer.prompts[kind][i] for i in rows]
        for name, kind in trainer.prompt_kinds.items()
        if name == "student" or name in trainer.models
    }
    return rollouts, prompts


def gradient_of_step(trainer: Trainer, rollouts, prompts, micro_batch_size: int):
    trainer.optimizer.zero_grad(set_to_none=True)
    batches = make_micro_batches(
        rollouts.completion_ids,
        rollouts.completion_mask,
        prompts,
        micro_batch_size,
        trainer.tokenizer.pad_token_id,
    )
    out = run_step(trainer.accelerator, trainer.objective, trainer.student, trainer.models, batches)
    return out.metrics, {n: p.grad.clone() for n, p in trainer.student.named_parameters()}


@pytest.mark.parametrize("objective", ["dopd", "tip"])
def test_step_is_identical_for_any_micro_batch_split(tmp_path, objective):
    # 2 prompts x 4 generations = 8 rollout rows, split as 1x8, 2x4 and 8x1.
    config = tiny_config(
        tmp_path,
        f"objective.name={objective}",
        "objective.top_k=8",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=4",
    )
    trainer = Trainer(config)
    rollouts, prompts = step_rollouts(trainer)
    reference_metrics, reference_grads = gradient_of_step(trainer, rollouts, prompts, 8)
    for micro_batch_size in (4, 1):
        metrics, grads = gradient_of_step(trainer, rollouts, prompts, micro_batch_size)
        for key in [k for k in reference_metrics if k.startswith("fraction/")]:
            assert metrics[key] == reference_metrics[key], key
        # Thresholds are means of per-token statistics from forwards of other batch shapes
        # (padding, GEMM vs GEMV): equal to float32 rounding, not bit for bit.
        for key in [k for k in reference_metrics if k.startswith("threshold/")]:
            assert_close(
                metrics[key], reference_metrics[key], ulps=REORDERED, dtype=torch.float32, msg=key
            )
        # The same float32 sums in another split agree to rounding.
        assert_close(
            metrics["loss"], reference_metrics["loss"], ulps=REORDERED, dtype=torch.float32
        )
        for name, grad in grads.items():
            assert_close(grad, reference_grads[name], ulps=REORDERED, msg=name)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _metric_lines(path: Path) -> list[dict]:
    drop = ("time/", "tokens_per_second")
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(drop)}
        for line in (path / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    overrides = (
        "optim.max_steps=4",
        "loop.save_every=2",
        "rollout.prompts_per_step=4",
        "rollout.num_generations=2",
    )
    Trainer(tiny_config(tmp_path / "full", *overrides)).train()
    Trainer(tiny_config(tmp_path / "split", *overrides)).train(stop_after=2)
    assert not (tmp_path / "split" / "model").exists()
    Trainer(tiny_config(tmp_path / "split", *overrides), resume=True).train()
    full, split = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "split" / "model")
    assert full.keys() == split.keys()
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert _metric_lines(tmp_path / "full") == _metric_lines(tmp_path / "split")


def test_training_reduces_the_objective_on_fixed_rollouts(tmp_path):
    config = tiny_config(
        tmp_path,
        "objective.top_k=8",
        "optim.lr=3e-3",
        "optim.warmup_steps=0",
        "optim.max_steps=30",
        "rollout.prompts_per_step=4",
    )
    trainer = Trainer(config)
    rollouts, prompts = step_rollouts(trainer)
    before, _ = gradient_of_step(trainer, rollouts, prompts, 8)
    trainer.train(stop_after=30)
    after, _ = gradient_of_step(trainer, rollouts, prompts, 8)
    assert after["loss"] < 0.85 * before["loss"]


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_trains_two_steps(tmp_path, name):
    config = tiny_config(
        tmp_path,
        f"objective.name={name}",
        "optim.max_steps=2",
        "optim.warmup_steps=0",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=2",
        "rollout.max_completion_length=6",
    )
    roles = AlternatingRoles() if build_objective(name).uses_token_classes else None
    trainer = Trainer(config, token_roles=roles)
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    trainer.train()
    records = _metric_lines(tmp_path)
    assert len(records) == 2
    assert all(
        torch.isfinite(torch.tensor(r["loss"])) and r["skipped_step"] == 0.0 for r in records
    )
    for group in trainer.objective.group_names:
        assert f"fraction/{group}" in records[-1]
    assert any(not torch.equal(p, before[n]) for n, p in trainer.student.named_parameters())


class AlternatingRoles:
    """Token roles by position: even tokens ``capability`` (oracle regime HT), odd ``format``
    (LH); counts what it labelled."""

    def __init__(self, odd: str = "format"):
        self.odd, self.counts = odd, {"capability": 0, odd: 0}

    def __call__(self, tokens: list[str]) -> list[str]:
        roles = ["capability" if i % 2 == 0 else self.odd for i in range(len(tokens))]
        for role in roles:
            self.counts[role] += 1
        return roles


def test_oracle_routing_without_token_roles_is_a_config_error(tmp_path):
    config = tiny_config(tmp_path / "run", "objective.name=dopd_oracle_routing")
    with pytest.raises(ConfigError, match="objective.routing='oracle' needs token classes"):
        Trainer(config)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_oracle_routing_refuses_a_class_it_does_not_map(tmp_path):
    config = tiny_config(
        tmp_path, "objective.name=dopd_oracle_routing", "rollout.prompts_per_step=1"
    )
    trainer = Trainer(config, token_roles=AlternatingRoles(odd="mystery"))
    with pytest.raises(ConfigError, match="'mystery'.*objective.oracle_regimes"):
        trainer.train_step()


def test_oracle_routing_regimes_follow_the_token_roles_on_both_loss_paths(tmp_path):
    metrics = {}
    for path in ("chunked", "reference"):
        config = tiny_config(
            tmp_path / path,
            "objective.name=dopd_oracle_routing",
            "objective.top_k=8",
            f"loop.loss_path={path}",
            "loop.loss_chunk_rows=5",
            "optim.micro_batch_size=3",
            "rollout.prompts_per_step=2",
            "rollout.num_generations=4",
        )
        roles = AlternatingRoles()
        trainer = Trainer(config, token_roles=roles)
        metrics[path] = trainer.train_step()
        tokens = roles.counts["capability"] + roles.counts["format"]
        assert metrics[path]["completion_tokens"] == tokens > 0
        assert metrics[path]["fraction/HT"] == roles.counts["capability"] / tokens
        assert metrics[path]["fraction/LH"] == roles.counts["format"] / tokens
        assert metrics[path]["fraction/LL"] == metrics[path]["fraction/HS"] == 0.0
    # The same rollouts and classes: each token's class reached its own row on both paths, so
    # each regime's loss agrees (a misaligned slice of classes would move tokens between them).
    for key in ("loss", "loss/HT", "loss/LH"):
        assert_close(
            metrics["chunked"][key],
            metrics["reference"][key],
            ulps=REORDERED,
            dtype=torch.float32,
            msg=key,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli_run(output_dir: Path, processes: int) -> None:
    overrides = [
        f"output_dir={output_dir}",
        f"data.train={DATA}",
        "data.eval=null",
        "loop.eval_every=0",
        "optim.max_steps=2",
    ]
    command = [sys.executable, "-m", "dopd.cli", "train", "--config", TINY]
    if processes > 1:
        launcher = [
            "-m",
            "accelerate.commands.launch",
            "--config_file",  # the shipped CPU data-parallel config
            str(ROOT / "configs" / "accelerate" / "ddp-cpu.yaml"),
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(_free_port()),
            "-m",
            "dopd.cli",
            "train",
            "--config",
            TINY,
        ]
        command = [sys.executable, *launcher]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    _cli_run(tmp_path / "one", 1)
    _cli_run(tmp_path / "two", 2)
    one, two = _metric_lines(tmp_path / "one"), _metric_lines(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            assert_close(b[key], a[key], ulps=REORDERED, dtype=torch.float32, msg=key)
    weights_one, weights_two = (
        _weights(tmp_path / "one" / "model"),
        _weights(tmp_path / "two" / "model"),
    )
    for key in weights_one:
        assert_close(weights_two[key], weights_one[key], ulps=REORDERED, msg=key)
