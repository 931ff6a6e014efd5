"""Cross-rank reductions the step needs, through accelerate (identity on one process), and the
check that the launch set up the world the launcher asked for (``check_world_size``)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor

from dopd.config import TrainConfig
from dopd.errors import ConfigError, DOPDError

# Where launchers tell a process how many processes they started: torchrun and accelerate launch
# (WORLD_SIZE, LOCAL_WORLD_SIZE), MPI (the rest). accelerate reads the same names.
WORLD_SIZE_VARIABLES = (
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "PMI_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_SIZE",
)
# Engines whose parameters are not whole torch tensors inside a module's forward (DeepSpeed's
# partitioned parameters, Megatron-LM's tensor parallelism, FSDP1's flat parameters). FSDP2 is not
# one: during a forward its modules hold the gathered, unsharded parameters.
SPLIT_HEADS = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def head_split_reason(accelerator: Accelerator) -> str | None:
    """Why the output head's weight is not a whole tensor during a forward, or None."""
    kind = accelerator.distributed_type
    if kind in SPLIT_HEADS:
        return f"distributed_type={kind.value} partitions the parameters"
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        return "FSDP version 1 flattens and frees the parameters after each forward (use FSDP2)"
    return None


def gather_rows(accelerator: Accelerator, values: Tensor) -> Tensor:
    """Concatenate ``[N_r, ...]`` tensors of every rank (lengths may differ) in rank order."""
    if accelerator.num_processes == 1:
        return values
    lengths = accelerator.gather(torch.tensor([values.shape[0]], device=values.device))
    padded = accelerator.pad_across_processes(values, dim=0)
    gathered = accelerator.gather(padded).view(accelerator.num_processes, -1, *values.shape[1:])
    return torch.cat([gathered[rank, : int(n)] for rank, n in enumerate(lengths.tolist())])


def sum_across(accelerator: Accelerator, value: Tensor) -> Tensor:
    """Sum of ``value`` over ranks."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.clone(), reduction="sum")


def check_world_size(accelerator: Accelerator, environ: Mapping[str, str] | None = None) -> None:
    """Raise ``DOPDError`` if the environment says this process is one of N > 1 but accelerate
    set up fewer: each process would then train alone, every one of them as the main process
    writing the same ``output_dir``.

    That happens e.g. with ``accelerate launch --multi_gpu --num_processes 2`` on a machine
    without GPUs and without ``ACCELERATE_USE_CPU=1``: the launcher starts 2 processes that each
    see ``WORLD_SIZE=2``, and accelerate, finding no device backend, runs each on its own.
    """
    environ = os.environ if environ is None else environ
    announced = {
        name: int(value)
        for name in WORLD_SIZE_VARIABLES
        if (value := environ.get(name, "").strip()).isdigit() and int(value) > 1
    }
    if not announced or accelerator.num_processes >= max(announced.values()):
        return
    names = ", ".join(f"{name}={value}" for name, value in announced.items())
    raise DOPDError(
        f"the launcher started {max(announced.values())} processes ({names}) but accelerate set "
        f"up {accelerator.num_processes} (distributed type "
        f"{accelerator.distributed_type.value}), so each process would train alone and write "
        "the same output_dir; fix: on CPUs launch with ACCELERATE_USE_CPU=1 accelerate launch "
        "--multi_gpu --num_processes N (or cpu: true in the accelerate config), on GPUs with "
        "accelerate launch --multi_gpu --num_processes N on a machine whose GPUs torch sees; "
        f"to train in one process, unset {', '.join(announced)}"
    )


def check_sharding(accelerator: Accelerator, config: TrainConfig) -> None:
    """Raise ``DOPDError`` if the launch asked for FSDP and did not get FSDP2, or ``ConfigError``
    for what does not run sharded yet: the ``ema`` privileged student (a full copy updated from
    sharded weights) and vLLM rollouts (their weight sync reads whole tensors)."""
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    kind = accelerator.distributed_type
    if asked and kind != DistributedType.FSDP:
        raise DOPDError(
            f"the accelerate config asks for FSDP but accelerate set up {kind.value}: it shards "
            "only on GPUs (on CPUs it starts data parallelism, every rank holding everything); "
            "fix: launch on GPUs, or use configs/accelerate/ddp.yaml"
        )
    if kind != DistributedType.FSDP:
        return
    if not accelerator.is_fsdp2:
        raise DOPDError(
            "FSDP version 1 is not supported (its flat parameters are freed after each forward); "
            "fix: set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp2.yaml)"
        )
    if config.views.priv_student_weights == "ema" and config.objective.build().uses_priv_student:
        raise ConfigError(
            "views.priv_student_weights=ema is not supported under FSDP2 (the average is a full "
            "copy of the sharded student); fix: use live or base"
        )
    if config.rollout.backend == "vllm":
        raise ConfigError(
            "rollout.backend=vllm is not supported under FSDP2 (the weight sync reads whole "
            "tensors); fix: set rollout.backend=hf, or launch with DDP"
        )
