"""One run per output_dir: an exclusive lock file ``output_dir/.lorakit.lock`` holding the owner's PID and host.

The lock is an ``flock`` on that file (POSIX), which the kernel releases however the owner ends, kill -9
included; the file's PID and host name the owner in the refusal. A lock file left by a process that is gone
(its ``flock`` released, or, where ``flock`` is missing, a PID no longer running on this host) is taken over
with a notice.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_FILE = ".lorakit.lock"

try:
    import fcntl
except ImportError:  # Windows: the PID check alone
    fcntl = None  # type: ignore[assignment]


class OutputDirLocked(ValueError):
    """output_dir is in use by another running lorakit process."""


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _owner(text: str) -> dict[str, Any]:
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


class RunLock:
    """The lock of one output_dir, held from `acquire` to `release` (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None
        self.notice: str | None = None
        """Set when a stale lock of a process that is gone was taken over."""

    def acquire(self) -> RunLock:
        """Take the lock or raise `OutputDirLocked` naming the owner; returns self."""
        for _ in range(100):  # the file we locked may have been deleted by its releasing owner meanwhile: retry
            fd = self._try_acquire()
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return self
            os.close(fd)
        raise OutputDirLocked(f"could not lock {self.path}: it keeps being replaced by other processes")

    def _try_acquire(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = _owner(os.read(fd, 4096).decode("utf-8", "replace"))
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise self._refusal(previous) from None
                except OSError:  # a file system without flock: the PID check below decides
                    self._check_pid(previous)
            else:
                self._check_pid(previous)
            if previous.get("pid") not in (None, os.getpid()):
                self.notice = (f"took over the lock {self.path} left by process {previous.get('pid')} on "
                               f"{previous.get('host', '?')}, which is no longer running")
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_pid(self, previous: dict[str, Any]) -> None:
        pid, host = previous.get("pid"), previous.get("host")
        if isinstance(pid, int) and pid != os.getpid() and (host != socket.gethostname() or _pid_running(pid)):
            raise self._refusal(previous)

    def _refusal(self, owner: dict[str, Any]) -> OutputDirLocked:
        who = (f"process {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}" if owner
               else "another process")
        return OutputDirLocked(
            f"training.output_dir={str(self.path.parent)!r} is in use by another lorakit run ({who}; lock file "
            f"{self.path}). Wait for it to finish, or train into another training.output_dir.")

    def release(self) -> None:
        """Delete the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
