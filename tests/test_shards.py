"""Sharded (FSDP2) student state in checkpoints: each rank's slice is written and restored bit for
bit, the shard files stitch back into the full tensors, and the final export gathers them into a
Hugging Face model in the export dtype. Two gloo processes (tests/sharded_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dopd.config import load_config
from dopd.errors import ConfigError, DOPDError
from dopd.training.checkpoint_files import checkpoint_dir, latest_checkpoint, verify_checkpoint
from dopd.training.distributed import check_sharding
from dopd.training.shards import is_sharded, layout, load_local_, local
from tests.test_trainer import _free_port
from tests.tolerance import REORDERED, assert_close

ROOT = Path(__file__).resolve().parents[1]


def _cpu_launch(*program: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``program`` in 2 gloo processes (the shipped CPU DDP config)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "ddp-cpu.yaml"),
        "--main_process_port",
        str(_free_port()),
        *program,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _launch(out: Path, mode: str) -> subprocess.CompletedProcess:
    """``tests/sharded_worker.py OUT MODE`` in 2 CPU processes."""
    return _cpu_launch(str(ROOT / "tests" / "sharded_worker.py"), str(out), mode)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    result = _launch(out, "full")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_kill_while_publishing_a_sharded_checkpoint_leaves_the_previous_one(tmp_path):
    killed = _launch(tmp_path, "killed_in_save")
    assert killed.returncode != 0  # the main process died of SIGKILL, the launcher stopped
    run = tmp_path / "run"
    # Every rank's slice of step 3 was written, but only into the unpublished .tmp- folder.
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert sorted(leftovers)[0].startswith(".tmp-step-000003-"), leftovers
    assert latest_checkpoint(run) == checkpoint_dir(run, 2)
    resumed = _launch(tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"resumed{rank}.json").read_text())
        assert report == {"step": 2, "bit_identical": True}
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())


def _reports(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_each_rank_writes_and_restores_its_slice_bit_for_bit(sharded_run):
    for report in _reports(sharded_run):
        assert report["sharded"] and report["step"] == 2
        assert report["bit_identical"]
        assert report["synced_generation_matches"]
    files = set(_reports(sharded_run)[0]["files"])
    for rank in ("rank00000", "rank00001"):
        assert {f"student.{rank}.safetensors", f"optimizer.{rank}.safetensors"} <= files
    assert "student.safetensors" not in files and "shards.json" in files
    assert verify_checkpoint(checkpoint_dir(sharded_run / "run", 2)) is None


@pytest.mark.slow
def test_the_chunked_loss_is_exact_under_fsdp2(sharded_run):
    # Sharded student and teacher on the chunked path against whole models on the reference path,
    # gradients averaged over the ranks as data parallelism does.
    for report in _reports(sharded_run):
        (loss, grads), (expected_loss, expected) = (
            report["chunked_sharded"],
            report["reference_whole"],
        )
        assert_close(torch.tensor(loss), torch.tensor(expected_loss), ulps=REORDERED, msg="loss")
        assert grads.keys() == expected.keys()
        for name in grads:
            assert_close(
                torch.tensor(grads[name]), torch.tensor(expected[name]), ulps=REORDERED, msg=name
            )


@pytest.mark.slow
def test_shard_files_stitch_into_the_full_tensors(sharded_run):
    checkpoint = checkpoint_dir(sharded_run / "run", 2)
    parts = [load_file(str(checkpoint / f"student.rank{r:05d}.safetensors")) for r in range(2)]
    shapes = json.loads((checkpoint / "shards.json").read_text())
    assert parts[0].keys() == parts[1].keys() == shapes.keys()
    for name, entry in shapes.items():
        assert entry["placements"] == ["S(0)"], name  # FSDP2 shards dim 0
        stitched = torch.cat([part[name] for part in parts])
        assert list(stitched.shape) == entry["shape"], name


@pytest.mark.slow
def test_the_export_gathers_the_shards_in_the_export_dtype(sharded_run):
    full = _reports(sharded_run)[0]["full"]
    model = AutoModelForCausalLM.from_pretrained(sharded_run / "model", dtype="auto")
    assert model.dtype == torch.bfloat16
    weights = dict(model.named_parameters())
    assert weights.keys() == full.keys()
    for name, values in full.items():
        expected = torch.tensor(values).to(torch.bfloat16)
        assert torch.equal(weights[name].detach(), expected), name


def test_plain_tensors_pass_through_unchanged():
    model = torch.nn.Linear(3, 2)
    assert not is_sharded(model) and layout(model.state_dict()) == {}
    saved = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    load_local_(model.state_dict(), saved, "linear")
    assert all(torch.equal(local(v), saved[k]) for k, v in model.state_dict().items())


def test_a_mismatched_tensor_is_named():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="weight is"):
        load_local_(model.state_dict(), {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "x")
    with pytest.raises(ValueError, match="missing \\['bias'\\]"):
        load_local_(model.state_dict(), {"weight": torch.zeros(2, 3)}, "x")


def _tiny(*overrides: str):
    return load_config(str(ROOT / "configs" / "tiny.yaml"), list(overrides))


def test_an_fsdp_launch_that_did_not_shard_is_refused(monkeypatch):
    # accelerate starts data parallelism on CPUs even when its config asks for FSDP.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    plain = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    with pytest.raises(DOPDError, match="asks for FSDP but accelerate set up MULTI_CPU"):
        check_sharding(plain, _tiny())
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_sharding(plain, _tiny())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["views.priv_student_weights=ema"], "priv_student_weights=ema"),
        (["rollout.backend=vllm"], "rollout.backend=vllm"),
    ],
)
def test_what_fsdp2_cannot_run_yet_is_refused(overrides, match):
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    check_sharding(fsdp2, _tiny())
    with pytest.raises(ConfigError, match=match):
        check_sharding(fsdp2, _tiny(*overrides))
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(DOPDError, match="fsdp_version: 2"):
        check_sharding(fsdp1, _tiny())


def _launch_fsdp2(output_dir: Path, *extra: str) -> None:
    result = _cpu_launch(str(ROOT / "tests" / "fsdp2_worker.py"), str(output_dir), *extra)
    assert result.returncode == 0, result.stderr[-3000:]


def _launch_ddp(output_dir: Path) -> None:
    from tests.fsdp2_worker import OVERRIDES

    overrides = [f"output_dir={output_dir}", *OVERRIDES]
    config = ["--config", str(ROOT / "configs" / "tiny.yaml")]
    sets = [item for override in overrides for item in ("--set", override)]
    result = _cpu_launch("-m", "dopd.cli", "train", *config, *sets)
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(run: Path) -> list[dict]:
    keys = ("step", "loss", "grad_norm", "completion_length", "fraction/HT")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in keys} for line in lines]


@pytest.mark.slow
def test_accelerates_fsdp2_prepare_trains_like_ddp_and_resumes_exactly(tmp_path):
    # accelerate's FSDP2 plugin, made to run on CPU (tests/fsdp2_worker.py): it shards the student
    # with its optimizer and the teacher; 4 steps equal DDP's to fp32 rounding, a run stopped
    # after 2 and resumed equals the uninterrupted one, and the export gathers the shards.
    _launch_fsdp2(tmp_path / "fsdp2")
    _launch_ddp(tmp_path / "ddp")
    _launch_fsdp2(tmp_path / "split", "--stop-after", "2")
    _launch_fsdp2(tmp_path / "split", "--resume")
    fsdp2, ddp, split = (_losses(tmp_path / name) for name in ("fsdp2", "ddp", "split"))
    assert len(fsdp2) == len(ddp) == 4
    for ours, theirs in zip(fsdp2, ddp):
        assert ours["completion_length"] == theirs["completion_length"]  # same rollouts
        for key in ("loss", "grad_norm", "fraction/HT"):
            assert_close(torch.tensor(ours[key]), torch.tensor(theirs[key]), ulps=REORDERED)
    assert split == fsdp2
    files = {p.name for p in (tmp_path / "fsdp2" / "checkpoints" / "step-000004").iterdir()}
    assert {"student.rank00000.safetensors", "student.rank00001.safetensors"} <= files
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp2" / "model")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "model")
    for (name, ours), (_, theirs) in zip(exported.named_parameters(), reference.named_parameters()):
        assert_close(ours.detach(), theirs.detach(), ulps=REORDERED, msg=name)
