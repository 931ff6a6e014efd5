"""Each process's own part of the student and optimizer state, as plain tensors and back.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, which accelerate's FSDP2 plugin applies) the
student's parameters, gradients and optimizer moments are ``DTensor``s: every process holds one
slice. A checkpoint stores each process's *local* tensors in its own safetensors file
(``dopd.training.checkpoint``); loading copies them back into the same layout. Unsharded runs
(one process, DDP) go through the same functions with ordinary tensors, held whole by every rank.

Nothing here talks to other processes: a shard is written and read by the process that owns it,
so the same world size and sharding must resume it (checked by the caller).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``DTensor`` (FSDP2 holds a slice of it)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(value: Tensor) -> Tensor:
    """This process's part of ``value``, detached and contiguous (a plain tensor as it is)."""
    part = value.to_local() if isinstance(value, DTensor) else value
    return part.detach().contiguous()


def layout(values: dict[str, Tensor]) -> dict[str, dict]:
    """name -> ``{"shape": full shape, "placements": [...]}`` of every ``DTensor`` in ``values``:
    enough to tell a resumed run whether its sharding matches, and to stitch shards together."""
    return {
        name: {"shape": list(value.shape), "placements": [str(p) for p in value.placements]}
        for name, value in values.items()
        if isinstance(value, DTensor)
    }


@torch.no_grad()
def load_local_(targets: dict[str, Tensor], saved: dict[str, Tensor], what: str) -> None:
    """Copy ``saved`` local tensors into the live ``targets`` (DTensors: into their local part).

    Raises ``ValueError`` naming the first tensor whose name, shape or dtype does not match.
    """
    missing = sorted(set(targets) - set(saved))
    unexpected = sorted(set(saved) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"{what}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, target in targets.items():
        part = target.to_local() if isinstance(target, DTensor) else target
        value = saved[name]
        if part.shape != value.shape or part.dtype != value.dtype:
            raise ValueError(
                f"{what}: {name} is {tuple(value.shape)} {value.dtype} in the checkpoint but "
                f"{tuple(part.shape)} {part.dtype} in this run"
            )
        part.copy_(value)


def like(value: Tensor, param: Tensor) -> Tensor:
    """``value`` (a local part of ``param``'s optimizer state) as a ``DTensor`` with ``param``'s
    mesh and placements when ``param`` is one; scalars (Adam's ``step``) and the state of plain
    parameters are returned as they are (``Optimizer.load_state_dict`` places them)."""
    if isinstance(param, DTensor) and value.dim() > 0:
        return DTensor.from_local(
            value.to(param.device),
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )
    return value


def full_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The whole state dict of a sharded ``model`` as plain CPU tensors on the main process (an
    empty dict elsewhere): a collective every rank must call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def parameters_by_index(groups: Iterable[dict]) -> list[Tensor]:
    """The parameters in the order a torch optimizer's ``state_dict`` numbers them."""
    return [param for group in groups for param in group["params"]]
