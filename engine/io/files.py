"""Writing small files so that a reader, or a run killed mid-write, never sees half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file beside it, renamed into place. The file gets the mode the umask
    gives, as ``open`` would (mkstemp's are private), and the temporary goes if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
