"""The run directory's rules: one run at a time, writable before the first step, files replaced whole.

A training run owns ``logs/train/<run_name>``. Rank 0 of the run takes an exclusive ``flock`` on
``<run dir>/run.lock`` before repae writes anything there and keeps it to the end; the other ranks
of the run are its children or its SLURM job step and write no run files. The kernel drops the lock
when its process dies (SIGKILL included; NFS servers reclaim the locks of a dead client), so a lock
never outlives its run. The file itself stays, holding the last holder's pid, host and start time
for the message a second run prints.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# ``.<name>.tmp-<pid>``: a file being written by process <pid> (temporary_path).
TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used (held by another run, not writable, ...)."""


class RunLock:
    """Exclusive lock on a run directory for the life of the ``with`` block."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirectoryError(
                f"run directory {self.path.parent} is in use by {holder}: wait for that run to end, or give "
                "this one another run_name"
            ) from None
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning(
                "the filesystem of %s does not support locks (%s): nothing stops a second run from using "
                "this run directory at the same time",
                self.path.parent,
                error,
            )
            return self
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (unlinking it would race a new holder)
            self.fd = None


def check_writable(folder: str | Path, config_key: str) -> None:
    """Create ``folder`` and a file in it now, rather than fail at the first save (50,000 steps in)."""
    folder = Path(folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        probe.unlink()
    except OSError as error:
        raise RunDirectoryError(
            f"cannot write to {folder} ({error.strerror or error}): fix its permissions or point {config_key} "
            "at a writable folder"
        ) from None


def write_atomically(path: str | Path, write: Callable[[IO], Any], binary: bool = False) -> None:
    """Call ``write`` on a temporary file next to ``path``, then rename it to ``path``, so a full disk
    or a kill leaves the old file (or none), never a truncated one."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text))


def temporary_path(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it into place: next to it, so the rename
    is atomic (same filesystem), and hidden."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``temporary_path`` files in ``folder``. Call at start with the run directory locked:
    no other process is writing there then, so each is a write that was killed (a checkpoint's is as
    large as the checkpoint)."""
    folder = Path(folder)
    stale = [path for path in (folder.iterdir() if folder.is_dir() else []) if TEMPORARY.match(path.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
