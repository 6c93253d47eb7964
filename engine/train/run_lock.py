"""One run per output name: an exclusive lock that a second run with the same name is refused, before it writes a
byte, instead of both overwriting one checkpoint and interleaving one metrics file."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class RunLocked(RuntimeError):
    """Another live process holds the lock."""


class RunLock:
    """An flock on `<folder>/.<name>.lock`. The kernel drops it when the process ends however it ends (kill -9
    included), so a crashed run never leaves a stale lock behind. The file stays: deleting it would let a run that
    opened it just before lock a file no later run can see."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"another run (process {holder}) is writing to the same outputs; it holds {self.path}. "
                            "Wait for it to end, or pick another output name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
