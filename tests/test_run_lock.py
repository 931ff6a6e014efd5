"""One writer per run, checkpoint retention and the world-size check: a second trainer on a locked
``output_dir`` is refused (in this process, or as ``dopd train`` beside a live holder: exit 2,
one line), a lock left by a dead process is taken over with a warning, the lock is released
after ``train()`` and after an exception, ``checkpoint.save_total_limit`` keeps the newest valid
checkpoints, and a launch whose world accelerate did not set up is refused."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate import PartialState
from accelerate.utils import DistributedType

from dopd.config import load_config
from dopd.errors import ConfigError, DOPDError
from dopd.training import checkpoint as checkpoint_module
from dopd.training import run_lock
from dopd.training.checkpoint_files import (
    STATE_FILE,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_stale_temporaries,
    verify_checkpoint,
)
from dopd.training.distributed import check_world_size
from dopd.training.run_lock import LOCK_NAME, RunLock
from dopd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY, DATA = str(ROOT / "configs" / "tiny.yaml"), str(ROOT / "configs" / "data" / "tiny.jsonl")
RUN = (
    f"data.train={DATA}",
    "data.eval=null",
    "loop.eval_every=0",
    "optim.max_steps=4",
    "optim.warmup_steps=1",
    "loop.save_every=1",
    "rollout.prompts_per_step=2",
    "rollout.num_generations=2",
    "rollout.max_completion_length=6",
)


def tiny_config(output_dir: Path, *overrides: str):
    return load_config(TINY, [f"output_dir={output_dir}", *RUN, *overrides])


def owner(folder: Path) -> dict:
    return json.loads((folder / LOCK_NAME).read_text())


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# -- the run lock ----------------------------------------------------------------------------
def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path):
    output_dir = tmp_path / "run"
    first = Trainer(tiny_config(output_dir))
    assert owner(output_dir)["pid"] == os.getpid()
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(DOPDError) as caught:
            Trainer(tiny_config(output_dir), **flags)
        message = str(caught.value)
        assert "\n" not in message and repr(str(output_dir)) in message
        assert f"pid {os.getpid()} on host {socket.gethostname()}, this process" in message
        assert "fix: close the other Trainer" in message
    # The refused trainers released nothing of the first one's: it still holds the folder.
    assert owner(output_dir)["pid"] == os.getpid()
    with pytest.raises(DOPDError, match="in use by another dopd run"):
        RunLock(output_dir).acquire()
    first.train()
    assert not (output_dir / LOCK_NAME).exists()
    assert (output_dir / "model").is_dir()
    # A finished run keeps no lock, so --resume (or a new trainer after close) may take it.
    with Trainer(tiny_config(output_dir), resume=True) as again:
        assert again.step == 4 and (output_dir / LOCK_NAME).exists()
    assert not (output_dir / LOCK_NAME).exists()


def test_dopd_train_beside_a_live_holder_exits_2_with_one_line(tmp_path):
    output_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from dopd.training.run_lock import RunLock; "
            f"lock = RunLock({str(output_dir)!r}).acquire(); print('locked', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        command = [sys.executable, "-m", "dopd.cli", "train", "--config", TINY]
        for item in (f"output_dir={output_dir}", *RUN):
            command += ["--set", item]
        result = subprocess.run(
            [*command, "--overwrite"],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"dopd: error: output_dir {str(output_dir)!r} is in use")
        assert f"(pid {holder.pid} on host {socket.gethostname()}, started " in lines[0]
        assert "fix: wait for that run to end or stop it" in lines[0]
        assert "Traceback" not in result.stdout + result.stderr
        assert os.listdir(output_dir) == [LOCK_NAME]  # --overwrite deleted nothing
        assert owner(output_dir)["pid"] == holder.pid
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not output_dir.exists()  # released; the folder it made too


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    pid = dead_pid()
    stale = {"pid": pid, "hostname": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (output_dir / LOCK_NAME).write_text(json.dumps(stale))
    trainer = Trainer(tiny_config(output_dir))  # the lock file alone does not make it non-empty
    err = capsys.readouterr().err
    assert f"warning: taking over the run lock {output_dir / LOCK_NAME} from pid {pid}" in err
    assert owner(output_dir)["pid"] == os.getpid()
    trainer.close()
    assert not (output_dir / LOCK_NAME).exists() and (output_dir / "config.yaml").is_file()


def test_an_unreadable_stale_lock_file_is_taken_over(tmp_path, capsys):
    (tmp_path / LOCK_NAME).write_bytes(b'{"pid": 12')  # killed mid-write
    with RunLock(tmp_path) as lock:
        assert lock.held and owner(tmp_path)["pid"] == os.getpid()
    assert "warning: taking over the run lock" in capsys.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists() and tmp_path.is_dir()  # it did not create it


def test_without_flock_the_pid_in_the_file_decides(tmp_path, monkeypatch, capsys):
    def no_flock(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    host = socket.gethostname()
    for holder in ({"pid": os.getppid(), "hostname": host}, {"pid": 1, "hostname": "elsewhere"}):
        (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
        with pytest.raises(DOPDError, match=f"pid {holder['pid']} on host {holder['hostname']}"):
            RunLock(tmp_path).acquire()
        assert owner(tmp_path) == holder  # untouched
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "hostname": host}))
    lock = RunLock(tmp_path).acquire()
    assert f"from pid {pid} on host {host}" in capsys.readouterr().err
    with pytest.raises(DOPDError, match="this process"):  # its own pid is alive: refused
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_released_after_an_exception_in_train(tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(output_dir))

    def boom():
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "train_step", boom)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert not (output_dir / LOCK_NAME).exists()
    RunLock(output_dir).acquire().release()  # free


def test_a_failed_start_releases_the_lock_and_leaves_nothing(tmp_path):
    output_dir = tmp_path / "new" / "run"
    with pytest.raises(DOPDError, match="no such file"):
        Trainer(tiny_config(output_dir, f"data.train={tmp_path / 'absent.jsonl'}"))
    assert not (tmp_path / "new").exists()  # the folders the lock created are gone again
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("an earlier run")
    with pytest.raises(DOPDError, match="is not empty"):
        Trainer(tiny_config(old))
    assert os.listdir(old) == ["notes.txt"]


def test_overwrite_keeps_holding_the_lock_while_it_clears(tmp_path):
    output_dir = tmp_path / "run"
    (output_dir / "checkpoints" / "step-000009").mkdir(parents=True)
    (output_dir / "notes.txt").write_text("an earlier run")
    trainer = Trainer(tiny_config(output_dir), overwrite=True)
    assert sorted(os.listdir(output_dir)) == [LOCK_NAME, "config.yaml"]
    assert owner(output_dir)["pid"] == os.getpid()
    with pytest.raises(DOPDError, match="in use by another dopd run"):
        RunLock(output_dir).acquire()  # the file the lock is held on survived the clearing
    trainer.close()
    trainer.close()  # idempotent
    assert os.listdir(output_dir) == ["config.yaml"]


# -- checkpoint retention ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def five_checkpoints(tmp_path_factory) -> Path:
    """A finished 5-step run with checkpoints step-000001 ... step-000005 (read-only: copy it)."""
    output_dir = tmp_path_factory.mktemp("five") / "run"
    Trainer(tiny_config(output_dir, "optim.max_steps=5")).train()
    return output_dir


@pytest.fixture
def run_copy(five_checkpoints, tmp_path) -> Path:
    shutil.copytree(five_checkpoints, tmp_path / "run")
    return tmp_path / "run"


def steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in list_checkpoints(output_dir))


def break_checkpoint(output_dir: Path, step: int) -> None:
    with open(checkpoint_dir(output_dir, step) / STATE_FILE, "a") as handle:
        handle.write(" ")
    assert verify_checkpoint(checkpoint_dir(output_dir, step)) is not None


def test_training_keeps_exactly_the_newest_n_checkpoints(tmp_path):
    output_dir = tmp_path / "run"
    Trainer(tiny_config(output_dir, "checkpoint.save_total_limit=2")).train()
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["step-000003", "step-000004"]
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(output_dir))


@pytest.mark.parametrize("keep, expected", [(0, [1, 2, 3, 4, 5]), (1, [5]), (3, [3, 4, 5])])
def test_prune_keeps_the_newest(run_copy, keep, expected):
    removed = prune_checkpoints(run_copy, keep, step=5)
    assert steps(run_copy) == expected and len(removed) == 5 - len(expected)
    assert sorted(os.listdir(run_copy / "checkpoints")) == [f"step-{s:06d}" for s in expected]


def test_only_valid_checkpoints_count(run_copy):
    # Step 4 just written, 3 broken, 1 and 2 valid: keeping 2 keeps 4 and 2, not 4 and 3.
    shutil.rmtree(checkpoint_dir(run_copy, 5))
    break_checkpoint(run_copy, 3)
    reports = []
    prune_checkpoints(run_copy, 2, step=4, report=reports.append)
    assert steps(run_copy) == [2, 4]
    assert len(reports) == 1 and reports[0].startswith(
        f"warning: deleting checkpoint {checkpoint_dir(run_copy, 3)}: {STATE_FILE} has "
    )
    assert latest_checkpoint(run_copy) == checkpoint_dir(run_copy, 4)


def test_newer_folders_and_other_names_are_left_alone(run_copy):
    break_checkpoint(run_copy, 5)  # 4 and 5: past the step just written (a resume from 3)
    root = run_copy / "checkpoints"
    others = [root / name for name in ("best", "steps-1", "step-000002.bak")]
    for folder in others:
        folder.mkdir()
    (root / "step-000000").write_text("a file, not a checkpoint folder")
    prune_checkpoints(run_copy, 1, step=3)
    assert steps(run_copy) == [3, 4, 5]
    assert all(folder.is_dir() for folder in others) and (root / "step-000000").is_file()


def test_a_kill_mid_delete_leaves_nothing_that_looks_valid(run_copy, monkeypatch):
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", lambda *args, **kwargs: None)
    prune_checkpoints(run_copy, 1, step=5)  # renamed aside but never removed: as if killed
    names = sorted(os.listdir(run_copy / "checkpoints"))
    assert names == [f".tmp-step-{s:06d}-pruned-{os.getpid()}" for s in (1, 2, 3, 4)] + [
        "step-000005"
    ]
    assert latest_checkpoint(run_copy) == checkpoint_dir(run_copy, 5) and steps(run_copy) == [5]
    monkeypatch.undo()
    assert len(remove_stale_temporaries(run_copy)) == 4  # what --resume does


def test_save_total_limit_is_validated_and_round_trips(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.save_total_limit=-1"):
        tiny_config(tmp_path, "checkpoint.save_total_limit=-1")
    with pytest.raises(ConfigError, match="checkpoint.save_total_limit"):
        tiny_config(tmp_path, "checkpoint.save_total_limit=1.5")
    config = tiny_config(tmp_path, "checkpoint.save_total_limit=3")
    assert config.checkpoint.save_total_limit == 3
    from dopd.config import save_config

    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


# -- world size --------------------------------------------------------------------------------
def test_a_world_accelerate_did_not_set_up_is_refused():
    alone = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    with pytest.raises(DOPDError) as caught:
        check_world_size(alone, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    message = str(caught.value)
    assert "started 2 processes (WORLD_SIZE=2, LOCAL_WORLD_SIZE=2) but accelerate set up 1" in (
        message
    )
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N" in message
    assert "unset WORLD_SIZE, LOCAL_WORLD_SIZE" in message
    with pytest.raises(DOPDError, match="OMPI_COMM_WORLD_SIZE=4"):
        check_world_size(alone, {"OMPI_COMM_WORLD_SIZE": "4"})
    for environ in ({}, {"WORLD_SIZE": "1"}, {"WORLD_SIZE": ""}, {"WORLD_SIZE": "two"}):
        check_world_size(alone, environ)
    together = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    check_world_size(together, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})


def test_the_trainer_refuses_a_mismatched_world_before_writing(tmp_path, monkeypatch):
    PartialState()  # accelerate's process state exists already, as one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    output_dir = tmp_path / "run"
    with pytest.raises(DOPDError, match="the launcher started 2 processes"):
        Trainer(tiny_config(output_dir))
    assert not output_dir.exists()


@pytest.mark.slow
def test_two_processes_without_a_process_group_are_refused(tmp_path):
    # --multi_gpu on a machine without GPUs, ACCELERATE_USE_CPU unset: the launcher starts 2
    # processes (WORLD_SIZE=2) and accelerate runs each alone; both stop before writing.
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    command += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    command += ["-m", "dopd.cli", "train", "--config", TINY]
    for item in (f"output_dir={output_dir}", *RUN):
        command += ["--set", item]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("dopd: error: ")]
    # The launcher may stop the second process once the first has failed, before it prints.
    assert result.returncode != 0 and 1 <= len(errors) <= 2, result.stderr[-3000:]
    assert all("the launcher started 2 processes (WORLD_SIZE=2" in line for line in errors)
    assert not output_dir.exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
