"""Cross-rank reductions the step needs, through accelerate (identity on one process)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor

# Engines that shard parameters and optimizer state across ranks.
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


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
