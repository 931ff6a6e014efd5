"""Checkpoints that load without unpickling anything, written atomically and verified on resume.

    output_dir/checkpoints/step-000050/
      manifest.json          written last: format, version, step, and every other file's
                             relative path, size in bytes and sha256
      trainer_state.json     {"step": 50, "world_size": 2}
      student.safetensors    the student's weights as trained (fp32 master copy)
      optimizer.safetensors  every tensor of the optimizer state ("state.<param>.<name>")
      optimizer.json         the rest of it: param_groups (lr, betas, ...) and which tensor is which
      scheduler.json         the LR scheduler's state_dict (LambdaLR: last_epoch, base_lrs, ...)
      rng.safetensors        every rank's torch CPU (and CUDA) generator state
      ema.safetensors        the EMA privileged student (views.priv_student_weights=ema only)
      scaler.json            the fp16 loss scaler (loop.mixed_precision=fp16 only)
      model/                 the student in Hugging Face format with the tokenizer (dopd eval)

A checkpoint is built in ``checkpoints/.tmp-step-000050-<pid>/``, every file and folder is
fsynced, and the folder is renamed into place (``dopd.io.atomic.publishing``); a kill at any moment
leaves either a complete checkpoint or a ``.tmp-`` folder that resume deletes. ``--resume`` takes
the newest checkpoint whose manifest checks out and names every one it skips, and why.

Only the main process writes; every process loads. That is complete under DDP and multi-CPU,
where every rank holds the same weights and optimizer state. FSDP and DeepSpeed shard that state,
which this format does not gather: ``require_support`` refuses them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from safetensors.torch import load_file, load_model, save_file, save_model

from dopd.errors import DOPDError
from dopd.io.atomic import publishing, remove_temporaries, sha256_file
from dopd.training.distributed import SHARDED

FORMAT, VERSION = "dopd-checkpoint", 1
MANIFEST, STATE_FILE = "manifest.json", "trainer_state.json"
REQUIRED = (
    STATE_FILE,
    "student.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng.safetensors",
)
_STEP_NAME = re.compile(r"step-(\d+)")


@dataclass
class TrainingState:
    """What a checkpoint holds besides the step: the prepared (possibly DDP-wrapped) student,
    its optimizer and LR scheduler as ``accelerator.prepare`` returned them, and the EMA."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    ema: torch.nn.Module | None = None


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def require_support(accelerator: Accelerator) -> None:
    """Raise unless the main process's state is the whole training state (no sharding)."""
    if accelerator.distributed_type in SHARDED:
        raise DOPDError(
            f"checkpoints need every rank to hold the full student and optimizer state, but this "
            f"run uses {accelerator.distributed_type.value}, which shards them; launch with DDP "
            "(accelerate launch --multi_gpu) instead"
        )


# -- writing ---------------------------------------------------------------------------------
def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, state: TrainingState, tokenizer
) -> Path:
    """Atomically write the full state after ``step`` optimizer steps; returns the folder.

    Every rank must call it (the RNG states are gathered); only the main process writes.
    """
    require_support(accelerator)
    rng = _gathered_rng(accelerator)
    path = checkpoint_dir(output_dir, step)
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        with publishing(path) as temp:
            _write_state(accelerator, temp, step, state, rng)
            _write_hf_model(accelerator.unwrap_model(state.model), tokenizer, temp / "model")
            write_manifest(temp, step)
    accelerator.wait_for_everyone()
    return path


def save_final_model(
    accelerator: Accelerator, model: torch.nn.Module, tokenizer, target: Path
) -> None:
    """Atomically write ``model`` (HF format) and ``tokenizer`` to ``target``, replacing it."""
    if accelerator.is_main_process:
        with publishing(target) as temp:
            _write_hf_model(accelerator.unwrap_model(model), tokenizer, temp)
    accelerator.wait_for_everyone()


def _write_hf_model(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _write_state(
    accelerator: Accelerator, folder: Path, step: int, state: TrainingState, rng: dict
) -> None:
    # save_model, unlike save_file, drops the duplicate names of tied weights (embeddings/head).
    save_model(accelerator.unwrap_model(state.model), str(folder / "student.safetensors"))
    tensors, structure = _flatten_optimizer(state.optimizer.state_dict())
    save_file(tensors, str(folder / "optimizer.safetensors"))
    _write_json(folder / "optimizer.json", structure)
    _write_json(folder / "scheduler.json", state.scheduler.state_dict())
    save_file(rng, str(folder / "rng.safetensors"))
    if state.ema is not None:
        save_model(state.ema, str(folder / "ema.safetensors"))
    if accelerator.scaler is not None:
        _write_json(folder / "scaler.json", accelerator.scaler.state_dict())
    _write_json(folder / STATE_FILE, {"step": step, "world_size": accelerator.num_processes})


def write_manifest(folder: Path, step: int) -> None:
    """List every file under ``folder`` with its size and sha256 in ``folder/manifest.json``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in files
    }
    _write_json(
        folder / MANIFEST, {"format": FORMAT, "version": VERSION, "step": step, "files": entries}
    )


def _write_json(path: Path, value: Any) -> None:
    try:
        text = json.dumps(value, indent=1)
    except TypeError as error:
        raise DOPDError(
            f"cannot write {path.name} of a checkpoint: {error}; "
            "its state must hold only numbers, strings, lists and tensors"
        ) from None
    path.write_text(text, encoding="utf-8")


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a torch optimizer state_dict into named tensors and a JSON structure naming them."""
    tensors, state = {}, {}
    for index, values in state_dict["state"].items():
        state[str(index)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous()
                state[str(index)][name] = {"tensor": f"state.{index}.{name}"}
            else:
                state[str(index)][name] = {"value": value}
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(
    tensors: dict[str, torch.Tensor], structure: dict, live_groups: list[dict]
) -> dict:
    """Inverse of ``_flatten_optimizer``; JSON lists become tuples where the live optimizer has
    one."""
    groups = [
        {
            key: tuple(value) if isinstance(live.get(key), tuple) else value
            for key, value in saved.items()
        }
        for saved, live in zip(structure["param_groups"], live_groups)
    ]
    groups += structure["param_groups"][len(groups) :]  # let torch report a group-count mismatch
    state = {
        int(index): {
            name: tensors[entry["tensor"]] if "tensor" in entry else entry["value"]
            for name, entry in values.items()
        }
        for index, values in structure["state"].items()
    }
    return {"state": state, "param_groups": groups}


def _gathered_rng(accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Every rank's generator states as ``{"torch_cpu.rank0": uint8 [5056], ...}``.

    dopd's rollouts draw from their own seeded generators; these matter only for dropout.
    """
    local = {"torch_cpu": torch.get_rng_state()}
    if accelerator.device.type == "cuda":
        local["torch_cuda"] = torch.cuda.get_rng_state(accelerator.device)
    states = {}
    for name, value in local.items():
        rows = (
            accelerator.gather(value.to(accelerator.device))
            .view(accelerator.num_processes, -1)
            .cpu()
        )
        states.update({f"{name}.rank{rank}": row.clone() for rank, row in enumerate(rows)})
    return states


# -- finding and verifying -------------------------------------------------------------------
def verify_checkpoint(path: str | Path) -> str | None:
    """None if the checkpoint at ``path`` is complete and intact, else what is wrong with it."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (
            f"{MANIFEST} is missing (the write was interrupted, "
            "or the checkpoint predates dopd's manifest format)"
        )
    except (OSError, ValueError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (
        FORMAT,
        VERSION,
    ):
        return f"{MANIFEST} is not a {FORMAT} version {VERSION} manifest"
    files, match = manifest.get("files"), _STEP_NAME.fullmatch(path.name)
    if match and manifest.get("step") != int(match.group(1)):
        return (
            f"{MANIFEST} says step {manifest.get('step')!r}, "
            f"the folder name says {int(match.group(1))}"
        )
    if not isinstance(files, dict) or (absent := [name for name in REQUIRED if name not in files]):
        return (
            f"{MANIFEST} does not list "
            f"{', '.join(absent) if isinstance(files, dict) else 'any files'}"
        )
    for name, entry in files.items():
        if (reason := _verify_file(path, name, entry)) is not None:
            return reason
    return None


def _verify_file(root: Path, name: str, entry: Any) -> str | None:
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return f"{MANIFEST} lists {name!r}, outside the checkpoint"
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("size"), int)
        or not isinstance(entry.get("sha256"), str)
    ):
        return f"{MANIFEST} entry of {name} is malformed: {entry!r}"
    file = root / name
    if not file.is_file():
        return f"{name} is missing"
    if (size := file.stat().st_size) != entry["size"]:
        return (
            f"{name} has {size} bytes, {MANIFEST} says {entry['size']} (truncated or overwritten)"
        )
    if sha256_file(file) != entry["sha256"]:
        return f"{name} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoints/step-N`` folder, newest (highest N) first, valid or not."""
    root = Path(output_dir) / "checkpoints"
    found = (
        [p for p in root.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir()]
        if root.is_dir()
        else []
    )
    return sorted(found, key=lambda p: int(_STEP_NAME.fullmatch(p.name).group(1)), reverse=True)


def latest_checkpoint(
    output_dir: str | Path, report: Callable[[str], None] = _stderr
) -> Path | None:
    """The newest checkpoint that passes ``verify_checkpoint``, or None; each one skipped on the
    way is reported as one line (which checkpoint, what is wrong)."""
    for path in list_checkpoints(output_dir):
        if (reason := verify_checkpoint(path)) is None:
            return path
        report(f"warning: skipping checkpoint {path}: {reason}")
    return None


# -- resuming --------------------------------------------------------------------------------
def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Delete what killed writers left (``.tmp-*`` under output_dir and its checkpoints/)."""
    output_dir = Path(output_dir)
    return remove_temporaries(output_dir) + remove_temporaries(output_dir / "checkpoints")


def load_latest_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, state: TrainingState
) -> int:
    """Load the latest valid checkpoint into ``state`` on every rank; returns its step (0: none).

    The main process chooses (and reports what it skips) and broadcasts the step, so all ranks
    load the same one. Checkpoints that exist but are all invalid stop the run rather than
    silently restarting it from step 0.
    """
    require_support(accelerator)
    step = torch.tensor([-1], device=accelerator.device)  # -1: none exists; -2: none is valid
    if accelerator.is_main_process:
        path = latest_checkpoint(output_dir)
        step[0] = (
            int(path.name.split("-")[1]) if path else (-2 if list_checkpoints(output_dir) else -1)
        )
    step = int(broadcast(step, from_process=0)[0])
    if step == -2:
        raise DOPDError(
            f"no valid checkpoint in {Path(output_dir) / 'checkpoints'} (see the warnings above); "
            "delete the broken ones to start again from step 0, or pass --overwrite"
        )
    if step < 0:
        return 0
    accelerator.print(f"resuming from {checkpoint_dir(output_dir, step)}")
    return load_checkpoint(accelerator, checkpoint_dir(output_dir, step), state)


def load_checkpoint(accelerator: Accelerator, path: Path, state: TrainingState) -> int:
    """Restore ``state`` (and this rank's RNG) from the checkpoint at ``path``; returns its step."""
    try:
        meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        load_model(accelerator.unwrap_model(state.model), str(path / "student.safetensors"))
        structure = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "optimizer.safetensors"))
        state.optimizer.load_state_dict(
            _unflatten_optimizer(tensors, structure, state.optimizer.state_dict()["param_groups"])
        )
        state.scheduler.load_state_dict(
            json.loads((path / "scheduler.json").read_text(encoding="utf-8"))
        )
        if state.ema is not None:
            load_model(state.ema, str(path / "ema.safetensors"))
        if accelerator.scaler is not None and (path / "scaler.json").is_file():
            accelerator.scaler.load_state_dict(
                json.loads((path / "scaler.json").read_text(encoding="utf-8"))
            )
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        raise DOPDError(
            f"checkpoint {path} does not fit this run ({type(error).__name__}: {error}); "
            "resume with the config it was written with (output_dir/config.yaml)"
        ) from error
    _restore_rng(accelerator, load_file(str(path / "rng.safetensors")), meta.get("world_size"))
    return int(meta["step"])


def _restore_rng(
    accelerator: Accelerator, states: dict[str, torch.Tensor], world_size: int | None
) -> None:
    if world_size != accelerator.num_processes:
        accelerator.print(
            f"warning: the checkpoint was written by {world_size} processes, "
            f"this run has {accelerator.num_processes}; "
            "generator states are not restored (this matters only with dropout)"
        )
        return
    rank = accelerator.process_index
    torch.set_rng_state(states[f"torch_cpu.rank{rank}"])
    if accelerator.device.type == "cuda" and f"torch_cuda.rank{rank}" in states:
        torch.cuda.set_rng_state(states[f"torch_cuda.rank{rank}"], accelerator.device)
