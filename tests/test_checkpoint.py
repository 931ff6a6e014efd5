"""Checkpoints: the format round-trips every part bit for bit, corruption is detected and skipped,
nothing is unpickled, writes are atomic, and a run killed with SIGKILL at random points resumes
to weights bit-identical to an uninterrupted run (scripts/stress_resume.py, 5 kills)."""

from __future__ import annotations

import importlib.util
import json
import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from dopd.config import load_config
from dopd.errors import DOPDError
from dopd.io.atomic import publishing, replacing
from dopd.training.checkpoint import (
    _flatten_optimizer,
    _unflatten_optimizer,
    load_checkpoint,
    require_support,
)
from dopd.training.checkpoint_files import (
    MANIFEST,
    checkpoint_dir,
    latest_checkpoint,
    verify_checkpoint,
)
from dopd.training.run_dir import truncate_metrics
from dopd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY, DATA = str(ROOT / "configs" / "tiny.yaml"), str(ROOT / "configs" / "data" / "tiny.jsonl")
# Two steps, a checkpoint after each, with the EMA privileged student so that every part exists.
RUN = (
    "optim.max_steps=2",
    "optim.warmup_steps=1",
    "loop.save_every=1",
    "views.priv_student_weights=ema",
    "rollout.prompts_per_step=2",
    "rollout.num_generations=2",
    "rollout.max_completion_length=6",
)


def tiny_config(output_dir: Path, *overrides: str):
    base = [f"output_dir={output_dir}", f"data.train={DATA}", "data.eval=null", "loop.eval_every=0"]
    return load_config(TINY, [*base, *RUN, *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints step-000001 and step-000002 (read-only: copy it)."""
    output_dir = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny_config(output_dir)).train()
    return output_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _state_of(trainer: Trainer) -> dict:
    optimizer = trainer.optimizer.state_dict()
    return {
        "student": {
            k: v.clone()
            for k, v in trainer.accelerator.unwrap_model(trainer.student).state_dict().items()
        },
        "ema": {k: v.clone() for k, v in trainer.ema.state_dict().items()},
        "optimizer_state": {
            (i, n): v.clone() if torch.is_tensor(v) else v
            for i, s in optimizer["state"].items()
            for n, v in s.items()
        },
        "param_groups": [dict(group) for group in optimizer["param_groups"]],
        "scheduler": trainer.scheduler.state_dict(),
    }


def _assert_same(a, b, where=""):
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_round_trip_restores_every_part_bit_for_bit(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run"))
    trainer.train()
    saved = _state_of(trainer)
    rng = load_file(str(checkpoint_dir(tmp_path / "run", 2) / "rng.safetensors"))["torch_cpu.rank0"]
    torch.manual_seed(12345)  # the resumed process starts from another generator state
    resumed = Trainer(tiny_config(tmp_path / "run"), resume=True)
    assert resumed.step == 2
    _assert_same(saved, _state_of(resumed))
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_checkpoint_is_safetensors_and_json_only(trained):
    checkpoint = checkpoint_dir(trained, 2)
    files = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    # The student is stored once (no Hugging Face copy beside student.safetensors).
    assert files == {
        "manifest.json",
        "trainer_state.json",
        "student.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "rng.safetensors",
        "ema.safetensors",
    }
    for name in files:  # each parses as what its name says; no torch.save zip or bare pickle
        if name.endswith(".safetensors"):
            load_file(str(checkpoint / name))
        elif name.endswith(".json"):
            json.loads((checkpoint / name).read_text())
        else:
            assert not (checkpoint / name).read_bytes().startswith((b"PK\x03\x04", b"\x80")), name
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    assert manifest["step"] == 2 and manifest["shards"] is None
    assert set(manifest["files"]) == files - {MANIFEST}
    assert verify_checkpoint(checkpoint) is None


def test_loading_never_unpickles(trained, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "fresh"))

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for module, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    assert load_checkpoint(trainer.accelerator, checkpoint_dir(trained, 2), trainer.state) == 2


def test_no_unsafe_deserialisation_in_the_package():
    for path in sorted((ROOT / "src" / "dopd").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle)|\bpickle\.", text, re.MULTILINE), (
            f"{path}: uses pickle"
        )
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"\.(save|load)_state\(", text), (
            f"{path}: accelerate's pickle-based save_state/load_state"
        )


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated file": ("student.safetensors", _truncate, "bytes"),
    "flipped byte": ("optimizer.safetensors", _flip_byte, "sha256"),
    "missing manifest": (MANIFEST, Path.unlink, "manifest.json is missing"),
    "torn manifest": (MANIFEST, _truncate, "manifest.json is unreadable"),
    "missing file": ("rng.safetensors", Path.unlink, "rng.safetensors is missing"),
    "wrong size": ("scheduler.json", lambda p: p.write_text(p.read_text() + " "), "bytes"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupted_checkpoint_is_reported_and_skipped(run_copy, case):
    name, corrupt, reason = CORRUPTIONS[case]
    corrupt(checkpoint_dir(run_copy, 2) / name)
    assert reason in verify_checkpoint(checkpoint_dir(run_copy, 2))
    reports = []
    assert latest_checkpoint(run_copy, report=reports.append) == checkpoint_dir(run_copy, 1)
    assert len(reports) == 1 and "step-000002" in reports[0] and reason in reports[0]


def test_resume_skips_a_corrupted_checkpoint_and_still_ends_bit_identical(
    trained, run_copy, capsys
):
    _flip_byte(checkpoint_dir(run_copy, 2) / "student.safetensors")
    (run_copy / "model").rename(run_copy / "old-model")
    trainer = Trainer(tiny_config(run_copy), resume=True)
    assert trainer.step == 1 and "skipping checkpoint" in capsys.readouterr().err
    trainer.train()  # redoes step 2 and writes a fresh step-000002 over the broken one
    assert verify_checkpoint(checkpoint_dir(run_copy, 2)) is None
    expected, actual = (
        load_file(str(trained / "model" / "model.safetensors")),
        load_file(str(run_copy / "model" / "model.safetensors")),
    )
    assert expected.keys() == actual.keys() and all(
        torch.equal(expected[k], actual[k]) for k in expected
    )


def test_resume_refuses_when_every_checkpoint_is_broken(run_copy):
    for step in (1, 2):
        (checkpoint_dir(run_copy, step) / MANIFEST).unlink()
    with pytest.raises(DOPDError, match="no valid checkpoint"):
        Trainer(tiny_config(run_copy), resume=True)


def test_stale_temporaries_are_ignored_and_removed_on_resume(run_copy):
    stale = [run_copy / "checkpoints" / ".tmp-step-000003-99999", run_copy / ".tmp-model-99999"]
    for folder in stale:
        folder.mkdir()
        (folder / "student.safetensors").write_bytes(b"half a file")
    assert latest_checkpoint(run_copy) == checkpoint_dir(run_copy, 2)
    assert Trainer(tiny_config(run_copy), resume=True).step == 2
    assert not any(folder.exists() for folder in stale)


def test_publishing_is_all_or_nothing(tmp_path):
    target = tmp_path / "model"
    with publishing(target) as temp:
        (temp / "a").write_text("old")
    with pytest.raises(RuntimeError), publishing(target) as temp:
        (temp / "a").write_text("new, half written")
        raise RuntimeError("killed")
    assert (target / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model"
    ]
    with publishing(target) as temp:  # replaces a non-empty folder
        (temp / "b").write_text("new")
    assert [p.name for p in target.iterdir()] == ["b"] and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["model"]
    with pytest.raises(RuntimeError), replacing(tmp_path / "config.yaml") as temp:
        temp.write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_metrics_truncation_drops_later_steps_and_a_torn_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo'
    )
    truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert path.read_text().endswith("\n") and "unreadable" in capsys.readouterr().err
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_optimizer_state_round_trips_through_tensors_and_json(seed):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    tensors, structure = _flatten_optimizer(state)
    restored = _unflatten_optimizer(
        tensors, json.loads(json.dumps(structure)), state["param_groups"]
    )
    _assert_same(state, restored)


def test_engines_with_their_own_state_are_refused():
    for kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        with pytest.raises(DOPDError, match="launch with DDP"):
            require_support(SimpleNamespace(distributed_type=kind))
    for kind in (DistributedType.FSDP, DistributedType.MULTI_CPU, DistributedType.NO):
        require_support(SimpleNamespace(distributed_type=kind))


def _stress_module():
    spec = importlib.util.spec_from_file_location(
        "stress_resume", ROOT / "scripts" / "stress_resume.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
    stress = _stress_module()
    timing = stress.reference_run(tmp_path)
    kills = stress.interrupted_run(tmp_path / "killed", 5, random.Random(0), timing)
    assert len(kills) == 5, kills
    stress.compare_runs(tmp_path / "reference", tmp_path / "killed")
    assert not any(
        p.name.startswith(".tmp-") for p in (tmp_path / "killed" / "checkpoints").iterdir()
    )
