"""Atomic file writes shared by the run directory (checkpoint, run_files) and the logit cache.

One implementation of "write beside, fsync, rename": a reader, or a run resumed after a
kill or power loss, sees either the previous file or the complete new one, never half of
one. write_atomic_reported adds the run directory's error report: a failed write (a full
disk, no permission) becomes a CheckpointWriteError that says the previous file was kept.
Kept free of torch and of the trainer so that the logit cache can use it without importing them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

__all__ = ["write_atomic", "write_bytes_atomic", "write_atomic_reported", "fsync_directory", "CheckpointWriteError"]


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


class CheckpointWriteError(RuntimeError):
    """A file could not be written (disk full, no permission); the previous file at its path is unchanged."""


class _WriteRecorder:
    """A file-like wrapper that remembers the OSError of a failed write: torch.save reports such a
    failure as a vague RuntimeError, and write_atomic_reported needs to tell a full disk from other errors."""

    def __init__(self, handle: BinaryIO):
        self.handle: BinaryIO = handle
        self.error: Optional[OSError] = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def write_atomic_reported(path: Path, write: Callable[[Any], None]) -> None:
    """write_atomic into a folder made if missing, through a _WriteRecorder; a failed write (a full disk,
    no permission) becomes a CheckpointWriteError that says whether an earlier file at `path` was kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recorder: Optional[_WriteRecorder] = None

    def recorded(handle: BinaryIO) -> None:
        nonlocal recorder
        recorder = _WriteRecorder(handle)
        write(recorder)

    try:
        write_atomic(path, recorded)
    except BaseException as error:  # write_atomic has removed the temporary file
        cause = error if isinstance(error, OSError) else getattr(recorder, "error", None)
        if cause is None:
            raise
        kept = (f"the previous {path.name} is kept intact" if path.exists()
                else f"no earlier {path.name} existed, so nothing was lost")
        reason = cause.strerror or str(cause)
        raise CheckpointWriteError(f"could not write {path} ({reason}); {kept}") from error
