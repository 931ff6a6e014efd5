"""Run by tests/test_shards.py in each of 2 CPU processes (``accelerate launch``): an FSDP2-sharded
tiny student (torch's ``fully_shard`` over a gloo mesh, the engine accelerate's FSDP2 plugin
applies on GPUs) is checkpointed, trained on, restored and exported.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/sharded_worker.py \
        OUT full|killed_in_save|resumed

Writes ``OUT/rank<r>.json``: whether the parameters were sharded, the files each checkpoint held,
and whether the step after a restore reproduced the step after the save bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dopd.config import ObjectiveConfig
from dopd.modeling.tiny import build_char_tokenizer, build_tiny_model
from dopd.training import checkpoint
from dopd.training.checkpoint import (
    TrainingState,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
    save_final_model,
)
from dopd.training.checkpoint_files import checkpoint_dir, remove_stale_temporaries
from dopd.training.rollout import generate_rollouts
from dopd.training.shards import is_sharded, local
from dopd.training.step import make_micro_batches, run_step

TOKENIZER = build_char_tokenizer("abcdefgh")


def tiny_student(seed: int = 0):
    """A 2-layer Qwen3 with an untied head, the same weights in every process."""
    return build_tiny_model(
        len(TOKENIZER),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=False,
        seed=seed,
    )


def sharded(model, accelerator: Accelerator):
    """``model`` with each decoder layer and the root sharded over every rank."""
    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharded_student(accelerator: Accelerator):
    """``tiny_student``, sharded, with AdamW and a schedule."""
    model = sharded(tiny_student(), accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return TrainingState(model, optimizer, scheduler)


def train_step(state: TrainingState, accelerator: Accelerator, step: int) -> None:
    """One AdamW step on this rank's own batch (FSDP2 averages the gradients)."""
    generator = torch.Generator().manual_seed(100 * step + accelerator.process_index)
    ids = torch.randint(3, len(TOKENIZER), (2, 6), generator=generator)
    loss = state.model(input_ids=ids, labels=ids).loss
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)


def local_parameters(state: TrainingState) -> dict[str, torch.Tensor]:
    return {name: local(p).clone() for name, p in state.model.named_parameters()}


def synced_generation_matches(accelerator: Accelerator) -> bool:
    """Greedy rollouts of the sharded student equal the unsharded model's, although the ranks
    decode for different numbers of steps (rank r: 3 + 4 r new tokens, r + 1 prompts)."""
    prompts = [
        [3 + i, 4, 5 + accelerator.process_index][: 2 + i % 2]
        for i in range(1 + accelerator.process_index)
    ]
    settings = {
        "eos_token_id": TOKENIZER.eos_token_id,
        "pad_token_id": TOKENIZER.pad_token_id,
        "max_completion_length": 3 + 4 * accelerator.process_index,
    }
    sharded = sharded_student(accelerator).model.eval()
    ours = generate_rollouts(sharded, prompts, synced=True, **settings)
    whole = generate_rollouts(tiny_student().eval(), prompts, **settings)
    return torch.equal(ours.completion_ids, whole.completion_ids) and torch.equal(
        ours.completion_mask, whole.completion_mask
    )


def dopd_step(accelerator: Accelerator, shard: bool, path: str) -> tuple[float, dict]:
    """One DOPD ``run_step`` (live privileged student, a teacher) on this rank's rollouts; its loss
    and the full gradient of every student parameter, averaged over ranks as DDP would."""
    student, teacher = tiny_student(0), tiny_student(1).eval().requires_grad_(False)
    if shard:
        student, teacher = sharded(student, accelerator), sharded(teacher, accelerator)
    generator = torch.Generator().manual_seed(accelerator.process_index)
    ids = torch.randint(3, len(TOKENIZER), (4, 5), generator=generator)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 3:] = False
    plain, hinted = [[3 + i, 4] for i in range(4)], [[5, 6, 3 + i, 4] for i in range(4)]
    prompts = {"student": plain, "priv_student": hinted, "teacher": hinted}
    batches = make_micro_batches(ids, mask, prompts, 2, TOKENIZER.pad_token_id)
    models = {"teacher": teacher, "priv_student": student}
    result = run_step(
        accelerator, ObjectiveConfig(name="dopd").build(), student, models, batches, path=path
    )
    assert result.path == path
    grads = {}
    for name, param in student.named_parameters():
        grad = param.grad.full_tensor() if shard else param.grad.clone()
        if not shard:
            torch.distributed.all_reduce(grad)
            grad /= accelerator.num_processes
        grads[name] = grad.tolist()
    return result.metrics["loss"], grads


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    generation = synced_generation_matches(accelerator)
    chunked_sharded = dopd_step(accelerator, shard=True, path="chunked")
    reference_whole = dopd_step(accelerator, shard=False, path="reference")
    state = sharded_student(accelerator)
    for step in range(2):
        train_step(state, accelerator, step)
    path = save_checkpoint(accelerator, out / "run", 2, state)
    train_step(state, accelerator, 2)
    after_save = local_parameters(state)

    restored = sharded_student(accelerator)  # fresh weights, no optimizer state
    step = load_checkpoint(accelerator, checkpoint_dir(out / "run", 2), restored)
    train_step(restored, accelerator, 2)
    after_restore = local_parameters(restored)
    save_final_model(accelerator, restored.model, TOKENIZER, out / "model", torch.bfloat16)
    # full_tensor() all-gathers: every rank calls it, the main process reports it.
    full = {name: p.full_tensor().tolist() for name, p in restored.model.named_parameters()}
    report = {
        "sharded": is_sharded(state.model),
        "step": step,
        "files": sorted(p.name for p in path.iterdir()),
        "synced_generation_matches": generation,
        "chunked_sharded": chunked_sharded,
        "reference_whole": reference_whole,
        "bit_identical": all(torch.equal(after_save[k], after_restore[k]) for k in after_save),
        "full": full if accelerator.is_main_process else {},
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))


def killed_in_save(out: Path) -> None:
    """Checkpoint step 2, then die by SIGKILL (main process) while step 3's checkpoint is being
    published: after every rank has written its slice, before the folder is renamed."""
    accelerator = Accelerator(cpu=True)
    state = sharded_student(accelerator)
    for step in range(2):
        train_step(state, accelerator, step)
    save_checkpoint(accelerator, out / "run", 2, state)
    (out / f"saved{accelerator.process_index}.json").write_text(
        json.dumps({k: v.tolist() for k, v in local_parameters(state).items()})
    )
    train_step(state, accelerator, 2)

    def die(temp: Path, target: Path) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.publish = die
    save_checkpoint(accelerator, out / "run", 3, state)


def resumed(out: Path) -> None:
    """Resume what ``killed_in_save`` left: the newest valid checkpoint, back into the slices."""
    accelerator = Accelerator(cpu=True)
    state = sharded_student(accelerator)
    if accelerator.is_main_process:
        remove_stale_temporaries(out / "run")
    accelerator.wait_for_everyone()
    step = load_latest_checkpoint(accelerator, out / "run", state)
    saved = json.loads((out / f"saved{accelerator.process_index}.json").read_text())
    restored = {k: v.tolist() for k, v in local_parameters(state).items()}
    (out / f"resumed{accelerator.process_index}.json").write_text(
        json.dumps({"step": step, "bit_identical": restored == saved})
    )


if __name__ == "__main__":
    {"full": main, "killed_in_save": killed_in_save, "resumed": resumed}[sys.argv[2]](
        Path(sys.argv[1])
    )
