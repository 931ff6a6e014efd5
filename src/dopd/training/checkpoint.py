"""Checkpoints that load without unpickling anything, written atomically and verified on resume.

    output_dir/checkpoints/step-000050/
      manifest.json          written last: format, version, step, shard count, and every other
                             file's relative path, size in bytes and sha256
      trainer_state.json     {"step": 50, "world_size": 2, "shards": null}
      student.safetensors    the student's weights as trained (master dtype), stored once
      optimizer.safetensors  every tensor of the optimizer state ("state.<param>.<name>")
      optimizer.json         the rest of it: param_groups (lr, betas, ...) and which tensor is which
      scheduler.json         the LR scheduler's state_dict (LambdaLR: last_epoch, base_lrs, ...)
      rng.safetensors        every rank's torch CPU (and CUDA) generator state
      ema.safetensors        the EMA privileged student (views.priv_student_weights=ema only)
      scaler.json            the fp16 loss scaler (loop.mixed_precision=fp16 only)

A sharded student (FSDP2: its parameters are ``DTensor``s) is stored as each rank's own slice:
``student.rank00000.safetensors``, ``optimizer.rank00000.safetensors`` + ``.json`` per rank, and
``shards.json`` (each sharded tensor's full shape and placements); every rank writes its own files
(``dopd.training.shards``) and the run resumes with the same number of processes. The student is
stored once: its Hugging Face export is written at the end of a run (``save_final_model``), not
into every checkpoint.

A checkpoint is built in ``checkpoints/.tmp-step-000050-<main pid>/``, every file and folder is
fsynced, and the folder is renamed into place by the main process (``dopd.io.atomic.publish``)
once every rank has written; a kill at any moment leaves either a complete checkpoint or a
``.tmp-`` folder that resume deletes. ``--resume`` takes the newest checkpoint whose manifest
checks out and names every one it skips, and why. DeepSpeed and Megatron-LM keep state this
format does not read: ``require_support`` refuses them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast
from safetensors.torch import load_file, load_model, save_file, save_model

from dopd.errors import DOPDError
from dopd.io.atomic import TEMP_PREFIX, publish, publishing
from dopd.training.checkpoint_files import (
    LAYOUT,
    STATE_FILE,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    write_json,
    write_manifest,
)
from dopd.training.shards import (
    full_state,
    is_sharded,
    layout,
    like,
    load_local_,
    local,
    parameters_by_index,
)

# Engines whose state lives outside the module and optimizer this format reads.
UNSUPPORTED = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


@dataclass
class TrainingState:
    """What a checkpoint holds besides the step: the prepared (possibly DDP-wrapped) student,
    its optimizer and LR scheduler as ``accelerator.prepare`` returned them, and the EMA."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    ema: torch.nn.Module | None = None


def require_support(accelerator: Accelerator) -> None:
    """Raise for engines whose training state this format cannot hold (DeepSpeed, Megatron-LM)."""
    if accelerator.distributed_type in UNSUPPORTED:
        raise DOPDError(
            f"checkpoints hold a torch module and optimizer, each rank's slice under FSDP2, but "
            f"this run uses {accelerator.distributed_type.value}, which keeps its own state; "
            "launch with DDP (accelerate launch --multi_gpu) or FSDP2 "
            "(configs/accelerate/fsdp2.yaml) instead"
        )


# -- writing ---------------------------------------------------------------------------------
def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    state: TrainingState,
    *,
    save_total_limit: int = 0,
) -> Path:
    """Atomically write the full state after ``step`` optimizer steps; returns the folder.

    Every rank must call it (the RNG states are gathered). A sharded student's ranks each write
    their own slice; the main process writes the rest and the manifest, publishes the folder, then
    deletes older checkpoints beyond ``save_total_limit`` (0: none; ``prune_checkpoints``).
    """
    require_support(accelerator)
    rng = _gathered_rng(accelerator)
    path = checkpoint_dir(output_dir, step)
    # The main process's name for it (.tmp-step-N-<pid>), which every rank writes into.
    main_pid = int(broadcast(torch.tensor([os.getpid()], device=accelerator.device))[0])
    temp = path.parent / f"{TEMP_PREFIX}{path.name}-{main_pid}"
    model = accelerator.unwrap_model(state.model)
    # None: one whole student; N: N ranks each hold a slice (FSDP2; N may be 1).
    shards = accelerator.num_processes if is_sharded(model) else None
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        if shards is not None or accelerator.is_main_process:
            suffix = "" if shards is None else f".rank{accelerator.process_index:05d}"
            _write_model_and_optimizer(temp, suffix, model, state.optimizer)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if shards is not None:
                write_json(temp / LAYOUT, layout(model.state_dict()))
            _write_state(accelerator, temp, step, state, rng, shards)
            write_manifest(temp, step, shards)
            publish(temp, path)
            prune_checkpoints(output_dir, save_total_limit, step=step)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return path


def save_final_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer,
    target: Path,
    dtype: torch.dtype | None = None,
) -> None:
    """Atomically write ``model`` (HF format, floating tensors cast to ``dtype`` when given) and
    ``tokenizer`` to ``target``, replacing it. Every rank must call it: a sharded student is
    gathered whole onto the main process first (torch's ``get_model_state_dict``)."""
    unwrapped = accelerator.unwrap_model(model)
    state = full_state(unwrapped) if is_sharded(unwrapped) else None
    if accelerator.is_main_process:
        with publishing(target) as temp:
            _write_hf_model(unwrapped, tokenizer, temp, state, dtype)
    accelerator.wait_for_everyone()


def _write_hf_model(
    model: torch.nn.Module,
    tokenizer,
    folder: Path,
    state: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    if dtype is not None:
        state = {
            name: value.to(dtype) if value.is_floating_point() else value
            for name, value in (state if state is not None else model.state_dict()).items()
        }
    model.save_pretrained(folder, safe_serialization=True, state_dict=state)
    if dtype is not None:
        # save_pretrained records the live parameters' dtype; the files hold ``dtype``.
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config["dtype"] = str(dtype).removeprefix("torch.")
        write_json(folder / "config.json", config)
    tokenizer.save_pretrained(folder)


def _write_model_and_optimizer(folder: Path, suffix: str, model: torch.nn.Module, optimizer):
    """This rank's student tensors and optimizer state (local slices when sharded)."""
    if is_sharded(model):
        save_file(
            {name: local(value) for name, value in _untied_state(model).items()},
            str(folder / f"student{suffix}.safetensors"),
        )
    else:
        # save_model, unlike save_file, drops the duplicate names of tied weights (embeddings/head).
        save_model(model, str(folder / f"student{suffix}.safetensors"))
    tensors, structure = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(folder / f"optimizer{suffix}.safetensors"))
    write_json(folder / f"optimizer{suffix}.json", structure)


def _untied_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with a tensor shared by several names (tied embeddings and head)
    under its first name only."""
    seen, kept = set(), {}
    for name, value in model.state_dict().items():
        key = local(value).data_ptr()
        if key not in seen or local(value).numel() == 0:
            seen.add(key)
            kept[name] = value
    return kept


def _write_state(
    accelerator: Accelerator,
    folder: Path,
    step: int,
    state: TrainingState,
    rng: dict,
    shards: int | None,
) -> None:
    write_json(folder / "scheduler.json", state.scheduler.state_dict())
    save_file(rng, str(folder / "rng.safetensors"))
    if state.ema is not None:
        save_model(state.ema, str(folder / "ema.safetensors"))
    if accelerator.scaler is not None:
        write_json(folder / "scaler.json", accelerator.scaler.state_dict())
    write_json(
        folder / STATE_FILE,
        {"step": step, "world_size": accelerator.num_processes, "shards": shards},
    )


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a torch optimizer state_dict into named tensors and a JSON structure naming them."""
    tensors, state = {}, {}
    for index, values in state_dict["state"].items():
        state[str(index)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = local(value)
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


# -- resuming --------------------------------------------------------------------------------
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
        _load_model_and_optimizer(accelerator, path, meta, state)
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


def _load_model_and_optimizer(
    accelerator: Accelerator, path: Path, meta: dict, state: TrainingState
) -> None:
    model = accelerator.unwrap_model(state.model)
    shards, sharded = meta.get("shards"), is_sharded(model)
    if (shards is not None) != sharded or (sharded and shards != accelerator.num_processes):
        raise ValueError(
            f"it holds the student {'whole' if shards is None else f'in {shards} shard(s)'}, "
            "this run "
            + (f"shards it over {accelerator.num_processes} ranks" if sharded else "is unsharded")
            + "; resume with the launch config (and number of processes) that wrote it"
        )
    suffix = "" if shards is None else f".rank{accelerator.process_index:05d}"
    if sharded:
        load_local_(
            _untied_state(model), load_file(str(path / f"student{suffix}.safetensors")), "student"
        )
    else:
        load_model(model, str(path / "student.safetensors"))
    structure = json.loads((path / f"optimizer{suffix}.json").read_text(encoding="utf-8"))
    params = parameters_by_index(state.optimizer.param_groups)
    tensors = {
        name: like(value, params[int(name.split(".")[1])])
        for name, value in load_file(str(path / f"optimizer{suffix}.safetensors")).items()
    }
    state.optimizer.load_state_dict(
        _unflatten_optimizer(tensors, structure, state.optimizer.state_dict()["param_groups"])
    )


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
