"""One writer per run: a lock on ``output_dir/.dopd-lock`` for as long as a trainer may write there.

    lock = RunLock(output_dir).acquire()  # DOPDError naming the holder if another one has it
    ...
    lock.release()                        # deletes the file; also on garbage collection and exit

The lock is ``fcntl.flock`` on the open file, so the kernel drops it when its process dies, however
it dies (SIGKILL, OOM killer, power cut); the file's JSON (pid, host, start time, command) only
names the holder in messages. A file left by a process that died is therefore unlocked: the next
run takes it over with a warning. ``flock`` locks belong to an open file, not to a process, so a
second ``Trainer`` on the same folder in the same process is refused too. Where the file system
has no ``flock`` (some network mounts) the pid in the file decides instead: a live process of that
pid on this host, or any process on another host, holds it.

Only the main process locks (``lock_run``); the other ranks write nothing to ``output_dir``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import weakref
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from dopd.errors import DOPDError

LOCK_NAME = ".dopd-lock"
# flock errors meaning "this file system cannot lock", not "someone holds it".
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """The lock on ``output_dir``: ``acquire`` takes it (creating the folder if needed),
    ``release`` gives it back and deletes the file (and the folder, if acquiring created it and
    it is still empty). Release is idempotent and also runs when the object is garbage-collected
    or the interpreter exits."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> RunLock:
        """Take the lock or raise ``DOPDError`` naming its holder and the fix; returns self."""
        if self.held:
            return self
        try:
            created = _make_folders(self.output_dir)
        except OSError as error:
            raise DOPDError(
                f"output_dir {str(self.output_dir)!r} cannot be created ({error}); "
                "fix: choose a folder this user can write to"
            ) from None
        try:
            descriptor = self._lock()
        except BaseException:
            _remove_empty(created)
            raise
        self._finalizer = weakref.finalize(
            self, _release, descriptor, self.path, created, os.getpid()
        )
        return self

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _lock(self) -> int:
        """An open descriptor of the lock file, locked, with this process named in it."""
        for _ in range(100):
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as error:
                raise DOPDError(
                    f"cannot create the run lock {self.path} ({error}); "
                    "fix: make output_dir writable, or choose another output_dir"
                ) from None
            try:
                if self._take(descriptor):
                    return descriptor
            except BaseException:
                os.close(descriptor)
                raise
            os.close(descriptor)  # released and deleted between our open and flock: again
        raise DOPDError(f"cannot take the run lock {self.path}: it keeps being replaced")

    def _take(self, descriptor: int) -> bool:
        """Lock ``descriptor`` and write this process into it; False if the file it refers to
        was deleted meanwhile (then the caller opens the new one)."""
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock = True
        except BlockingIOError:
            raise self._busy(_read_owner(descriptor)) from None
        except OSError as error:
            if error.errno not in _NO_FLOCK:
                raise
            flock = False
        try:
            if not os.path.samestat(os.fstat(descriptor), os.stat(self.path)):
                return False
        except FileNotFoundError:
            return False
        previous = _read_owner(descriptor)
        if not flock and previous is not None and _running(previous):
            raise self._busy(previous)
        if os.fstat(descriptor).st_size:  # left by a holder that died without releasing it
            who = f"from {_describe(previous)}" if previous else "(its owner is unreadable)"
            print(
                f"warning: taking over the run lock {self.path} {who}: no process holds it any "
                "more (its holder was killed or crashed)",
                file=sys.stderr,
                flush=True,
            )
        _write_owner(descriptor)
        return True

    def _busy(self, owner: dict | None) -> DOPDError:
        if owner is None:
            who = f"a process that has not written its name into {self.path} yet"
        else:
            who = _describe(owner)
        fix = "wait for that run to end or stop it, or give this run another output_dir"
        if owner is not None and _is_this_process(owner):
            fix = (
                "close the other Trainer of this folder first (Trainer.close(); train() closes "
                "when it ends), or give this one another output_dir"
            )
        return DOPDError(
            f"output_dir {str(self.output_dir)!r} is in use by another dopd run ({who}); fix: {fix}"
        )


def lock_run(accelerator: Accelerator, output_dir: str | Path) -> RunLock | None:
    """Take ``output_dir``'s lock on the main process (None on the others). Every process must
    call it: if the main process cannot take the lock, every process raises, so that no rank goes
    on to wait for a main process that stopped."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(output_dir).acquire()
        except DOPDError as caught:
            error = caught
    if accelerator.num_processes > 1:
        failed = torch.tensor([error is not None], dtype=torch.int32, device=accelerator.device)
        if int(broadcast(failed, from_process=0)[0]) and error is None:
            error = DOPDError(
                f"the main process could not lock output_dir {str(output_dir)!r}; see its error"
            )
    if error is not None:
        raise error
    return lock


def _release(descriptor: int, path: Path, created: list[Path], pid: int) -> None:
    if os.getpid() != pid:  # a forked child exiting: the lock is its parent's
        os.close(descriptor)
        return
    try:
        # Delete the file while still holding it, so that whoever opens it next creates a new one.
        if os.path.samestat(os.fstat(descriptor), os.stat(path)):
            path.unlink()
    except OSError:
        pass  # the folder was deleted under us (a temporary directory): nothing left to remove
    finally:
        os.close(descriptor)
    _remove_empty(created)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the ones this call created, outermost
    first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        created.append(path)
    return created


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders ``_make_folders`` created, innermost first, while they are empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


def _write_owner(descriptor: int) -> None:
    owner = {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    data = (json.dumps(owner, indent=1) + "\n").encode("utf-8")
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, data, 0)
    os.fsync(descriptor)


def _read_owner(descriptor: int) -> dict | None:
    """The holder named in the lock file, or None if it names none (empty, torn, foreign)."""
    try:
        size = os.fstat(descriptor).st_size
        owner = json.loads(os.pread(descriptor, min(size, 1 << 16), 0).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or type(owner.get("pid")) is not int or owner["pid"] < 1:
        return None
    return owner


def _describe(owner: dict) -> str:
    text = f"pid {owner['pid']} on host {owner.get('hostname', '?')}"
    if _is_this_process(owner):
        text += ", this process"
    if owner.get("started"):
        text += f", started {owner['started']}"
    return text


def _is_this_process(owner: dict) -> bool:
    return owner.get("pid") == os.getpid() and owner.get("hostname") == socket.gethostname()


def _running(owner: dict) -> bool:
    """Whether the owner may still run: its pid is alive on this host, or it is on another host
    (which this process cannot check)."""
    if owner.get("hostname") != socket.gethostname():
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # alive but another user's; or a pid this platform cannot hold
    return True


def clear_run_folder(output_dir: str | Path) -> None:
    """Delete everything in ``output_dir`` but its lock file (``--overwrite``): deleting the file
    a lock is held on would let another run create and lock a new one beside this one."""
    for path in Path(output_dir).iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
