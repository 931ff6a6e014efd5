"""Checkpoint folders on disk: names, the manifest that vouches for one, verification, finding
the newest valid one, and retention (``dopd.training.checkpoint`` writes and loads their
contents)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dopd.errors import DOPDError
from dopd.io.atomic import fsync_path, remove_temporaries, sha256_file, temp_path

FORMAT, VERSION = "dopd-checkpoint", 2
MANIFEST, STATE_FILE, LAYOUT = "manifest.json", "trainer_state.json", "shards.json"
COMMON = (STATE_FILE, "scheduler.json", "rng.safetensors")
_STEP_NAME = re.compile(r"step-(\d+)")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def shard_names(shards: int | None) -> tuple[str, ...]:
    """The model and optimizer files of a checkpoint whose student ``shards`` ranks held in slices
    (None: whole)."""
    if shards is None:
        return ("student.safetensors", "optimizer.safetensors", "optimizer.json")
    return (LAYOUT,) + tuple(
        f"{part}.rank{rank:05d}.{ext}"
        for rank in range(shards)
        for part, ext in (
            ("student", "safetensors"),
            ("optimizer", "safetensors"),
            ("optimizer", "json"),
        )
    )


def write_manifest(folder: Path, step: int, shards: int | None = None) -> None:
    """List every file under ``folder`` with its size and sha256 in ``folder/manifest.json``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in files
    }
    write_json(
        folder / MANIFEST,
        {"format": FORMAT, "version": VERSION, "step": step, "shards": shards, "files": entries},
    )


def write_json(path: Path, value: Any) -> None:
    try:
        text = json.dumps(value, indent=1)
    except TypeError as error:
        raise DOPDError(
            f"cannot write {path.name} of a checkpoint: {error}; "
            "its state must hold only numbers, strings, lists and tensors"
        ) from None
    path.write_text(text, encoding="utf-8")


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
    shards = manifest.get("shards")
    if shards is not None and (
        isinstance(shards, bool) or not isinstance(shards, int) or shards < 1
    ):
        return f"{MANIFEST} has no valid shard count ({shards!r})"
    if match and manifest.get("step") != int(match.group(1)):
        return (
            f"{MANIFEST} says step {manifest.get('step')!r}, "
            f"the folder name says {int(match.group(1))}"
        )
    required = COMMON + shard_names(shards)
    if not isinstance(files, dict) or (absent := [name for name in required if name not in files]):
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


def prune_checkpoints(
    output_dir: str | Path, keep: int, *, step: int, report: Callable[[str], None] = _stderr
) -> list[Path]:
    """Keep the checkpoint of ``step`` (just published) and the newest ``keep - 1`` valid ones
    older than it; delete every other ``step-N`` folder older than ``step``. Returns the deleted
    folders; ``keep`` 0 deletes nothing. Main process only.

    Only valid checkpoints count: the older ones are verified newest first (``verify_checkpoint``,
    which hashes them) until ``keep - 1`` pass, so a broken one never pushes the last good one
    out; a broken one met on the way is deleted with a warning (resume would skip it). Past that,
    nothing is verified. Folders newer than ``step`` (written before a resume that found them
    invalid) are left alone: the run replaces them when it reaches their step. Each folder is
    renamed to a ``.tmp-`` name before it is removed, so a kill midway leaves nothing that looks
    like a checkpoint (resume deletes ``.tmp-`` leftovers).
    """
    if keep <= 0:
        return []
    kept, doomed = 1, []
    for path in list_checkpoints(output_dir):
        if int(_STEP_NAME.fullmatch(path.name).group(1)) >= step:
            continue
        if kept < keep:
            if (reason := verify_checkpoint(path)) is None:
                kept += 1
                continue
            report(f"warning: deleting checkpoint {path}: {reason}")
        doomed.append(path)
    removed = {}
    for path in doomed:
        aside = temp_path(path.with_name(path.name + "-pruned"))
        try:
            os.rename(path, aside)
        except OSError as error:
            report(f"warning: could not delete old checkpoint {path} ({error}); it is kept")
            continue
        removed[path] = aside
    if removed:
        fsync_path(Path(output_dir) / "checkpoints")  # the renames outlive a power cut
    for aside in removed.values():
        shutil.rmtree(aside, ignore_errors=True)
    return list(removed)


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Delete what killed writers left (``.tmp-*`` under output_dir and its checkpoints/)."""
    output_dir = Path(output_dir)
    return remove_temporaries(output_dir) + remove_temporaries(output_dir / "checkpoints")
