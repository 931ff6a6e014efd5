"""Checkpoints in ``output_dir/checkpoints/step-NNNNNN``: accelerate's full training state
(model weights as safetensors, optimizer, scheduler, RNG, registered objects such as an EMA
copy), the model in Hugging Face format under ``model/``, and ``trainer_state.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, model, tokenizer) -> Path:
    """Write the full state after ``step`` optimizer steps; returns the checkpoint folder."""
    path = checkpoint_dir(output_dir, step)
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(path / "model", safe_serialization=True)
        tokenizer.save_pretrained(path / "model")
        # Written last: a checkpoint without it is incomplete and never resumed from.
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
    return path


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(output_dir) / "checkpoints"
    complete = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return max(complete, key=lambda p: p.name, default=None)


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restore the state saved at ``path``; returns its step."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())["step"]
