"""Crash-safe writes: a file or folder appears under its final name complete or not at all.

Everything is first written under a ``.tmp-`` name next to its target, flushed to disk
(``fsync`` of every file and folder), then renamed into place, and the parent folder is flushed
so that the rename itself survives a power cut. ``os.rename`` within one file system is atomic on
POSIX, so a reader (``--resume``) sees either the old state or the new one, never a torn one.

    with replacing(output_dir / "config.yaml") as temp:
        save_config(config, temp)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder's: its entries) to stable storage."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """The file's sha256 as hex, read in 4 MiB chunks (``hashlib.file_digest`` needs 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def temp_path(target: Path) -> Path:
    """The ``.tmp-NAME-PID`` sibling of ``target``; the pid keeps two writers apart."""
    return target.parent / f"{TEMP_PREFIX}{target.name}-{os.getpid()}"


@contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yield a temporary path to write a file to; on success it atomically replaces ``target``."""
    temp = temp_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield temp
        fsync_path(temp)
        os.replace(temp, target)
        fsync_path(target.parent)
    finally:
        temp.unlink(missing_ok=True)


def write_text_atomically(target: Path, text: str) -> None:
    """Replace ``target``'s contents with ``text`` (UTF-8) so that no reader sees half of it."""
    with replacing(target) as temp:
        temp.write_text(text, encoding="utf-8")


@contextmanager
def publishing(target: Path, temp: Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it is synced and renamed to ``target``.

    Every file and folder under it is fsynced here, before the rename. An existing ``target``
    is moved aside first and removed after (``os.rename`` cannot replace a non-empty folder);
    in between, readers see no
    ``target`` at all, never a mixed one. On any error the temporary folder is removed.
    """
    temp = temp or temp_path(target)
    shutil.rmtree(temp, ignore_errors=True)  # a leftover of an earlier process with our pid
    temp.mkdir(parents=True)
    try:
        yield temp
        publish(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def publish(temp: Path, target: Path) -> None:
    """Sync the finished folder ``temp`` and rename it to ``target`` (``publishing``'s last step,
    for a folder that several processes filled)."""
    sync_tree(temp)
    old = temp_path(target.with_name(target.name + "-replaced"))
    if target.exists():
        os.rename(target, old)
    os.rename(temp, target)
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def sync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, ``root`` included."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the ``.tmp-*`` leftovers of killed writers directly inside ``folder``; returns them.

    Only call this when no other process writes into ``folder`` (on resume, on the main process).
    """
    stale = sorted(folder.glob(f"{TEMP_PREFIX}*")) if folder.is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
