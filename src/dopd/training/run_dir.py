"""The run's folder: refuse to mix a new run into an old one, clear or tidy it once every input
has loaded, and cut ``metrics.jsonl`` back to the checkpoint a run resumes from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from dopd.errors import DOPDError
from dopd.io.atomic import write_text_atomically
from dopd.training.checkpoint import require_support
from dopd.training.checkpoint_files import remove_stale_temporaries
from dopd.training.run_lock import LOCK_NAME, clear_run_folder


def check_output_dir(
    accelerator: Accelerator, output_dir: Path, resume: bool, overwrite: bool
) -> None:
    """Refuse to mix a new run into an old one unless asked to resume it or replace it (writes
    nothing)."""
    require_support(accelerator)  # fail now, not at the first checkpoint
    # The run lock this trainer holds is not content: a folder holding only it is empty.
    entries = [p.name for p in output_dir.iterdir()] if output_dir.is_dir() else []
    entries = [name for name in entries if name != LOCK_NAME]
    if entries and not (resume or overwrite):
        raise DOPDError(
            f"output_dir {str(output_dir)!r} is not empty; "
            "pass --resume to continue it or --overwrite to replace it"
        )


def prepare_output_dir(
    accelerator: Accelerator, output_dir: Path, resume: bool, overwrite: bool
) -> None:
    """Once every input has loaded: clear an ``--overwrite`` run (all but the run lock we hold);
    on resume, delete the ``.tmp-`` leftovers of a writer that was killed."""
    if overwrite and not resume and output_dir.exists() and accelerator.is_main_process:
        clear_run_folder(output_dir)
    if resume and accelerator.is_main_process:
        for path in remove_stale_temporaries(output_dir):
            print(f"removed {path}, left by an interrupted write", file=sys.stderr)
    accelerator.wait_for_everyone()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (left by a run that died after its last checkpoint) and a
    torn line (a run killed mid-write); the file is replaced atomically."""
    if not path.exists():
        return
    kept, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            torn += bool(line.strip())
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and record["step"] <= step
        ):
            kept.append(line)
    if torn:
        print(
            f"warning: {path}: dropped {torn} unreadable line(s), "
            "written by a run that was killed mid-write",
            file=sys.stderr,
        )
    write_text_atomically(path, "".join(line + "\n" for line in kept))
