"""Atomic file writes shared by model files, checkpoints, histories and plots."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

__all__ = ["atomic_write_bytes", "remove_stale_temps", "temp_name"]

_TOKEN_BYTES = 6  # the random part of a temporary file's name: 12 hex digits


def temp_name(path: Path) -> Path:
    """A new temporary file's name for ``path``: ``.NAME.<12 hex digits>.tmp`` beside it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(_TOKEN_BYTES)}.tmp")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writes of ``path`` left behind (a kill mid-write).

    Only names :func:`atomic_write_bytes` makes for this very ``path`` are touched
    (``.NAME.<12 hex digits>.tmp`` in its directory); a file that cannot be removed is left.

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.tmp")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


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
    tmp = temp_name(path)
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
