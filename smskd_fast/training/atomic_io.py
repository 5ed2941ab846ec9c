"""Atomic file writes shared by the run directory (runio) and the logit cache (cache).

One implementation of "write beside, fsync, rename": a reader, or a run resumed after a
kill or power loss, sees either the previous file or the complete new one, never half of
one. Kept free of torch and of the trainer so that cache.py can use it without importing them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["write_atomic", "write_bytes_atomic", "fsync_directory"]


def fsync_directory(folder: Path) -> None:
    """Makes a rename in `folder` durable (a power loss after it cannot bring the old file back)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """write(handle) into PATH.tmp in the same folder, flush, fsync, os.replace onto `path`, fsync the folder.

    On any error, an interrupt too, the temporary file is removed and the error re-raised unchanged:
    `path` is then exactly as it was. The folder must exist."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    fsync_directory(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` as the whole new content of `path`, written by write_atomic."""
    write_atomic(path, lambda handle: handle.write(data))
