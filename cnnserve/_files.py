"""Atomic file writes shared by model files, checkpoints, histories and plots."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["atomic_write_bytes"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a crash at any moment leaves the old file or the new.

    The bytes go to a new temporary file in the same directory, which is flushed to disk and
    then renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows); the directory is
    synced too where the platform allows, so that the rename itself survives a power cut. On
    any error the temporary file is removed and ``path`` is untouched. A new file gets the
    permissions ``open()`` would give it (the umask applies); a replaced file keeps its mode.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(handle.fileno(), path.stat().st_mode & 0o7777)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    return path
