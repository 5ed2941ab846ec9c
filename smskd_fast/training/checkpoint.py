"""Run-directory I/O: atomic checkpoints, model files, JSON-lines metrics, a terminal progress bar."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from smskd_fast.training.atomic_io import write_atomic, write_bytes_atomic

__all__ = ["save_atomic", "write_text_atomic", "save_model_file", "load_model_file", "load_weights",
           "append_jsonl", "read_jsonl", "Progress", "CheckpointWriteError"]


class CheckpointWriteError(RuntimeError):
    """A file could not be written (disk full, no permission); the previous file at its path is unchanged."""


class _WriteRecorder:
    """A file-like wrapper that remembers the OSError of a failed write: torch.save reports such a
    failure as a vague RuntimeError, and save_atomic needs to tell a full disk from other errors."""

    def __init__(self, handle: Any):
        self.handle, self.error = handle, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """atomic_io.write_atomic through a _WriteRecorder; a failed write (a full disk, no permission) becomes
    a CheckpointWriteError that says whether an earlier file at `path` was kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recorder = None

    def recorded(handle: Any) -> None:
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


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then os.replace: a reader never sees half a file.
    A failed write (e.g. a full disk) raises CheckpointWriteError and leaves the previous file as it was."""
    _write_atomic(Path(path), lambda handle: torch.save(obj, handle))


def write_text_atomic(path: Path, text: str) -> None:
    """A text file written like save_atomic (config.yaml, summary.json: never seen half-written)."""
    _write_atomic(Path(path), lambda handle: handle.write(text.encode()))


def save_model_file(model: nn.Module, name: str, num_classes: int, in_channels: int, path: Path) -> None:
    """A self-describing model file: zoo name, class count, input channels and weights."""
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    save_atomic({"model": name, "num_classes": num_classes, "in_channels": in_channels, "state_dict": state}, path)


def load_model_file(path: Path, expected_name: Optional[str] = None,
                    map_location: str = "cpu") -> Dict[str, Any]:
    """Reads a model file written by save_model_file; checks its model name when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found (train one with `smskd-fast train-teacher`)")
    try:
        entry = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, not a torch file, or pickled objects that weights_only refuses
        raise ValueError(f"{path} is not a readable model file ({type(error).__name__}); give a file "
                         "written by `smskd-fast train` or `smskd-fast train-teacher` (student.pt)") from None
    if not isinstance(entry, dict) or "state_dict" not in entry or "model" not in entry:
        raise ValueError(f"{path} is not a smskd-fast model file (it has no 'model' and 'state_dict' entries); "
                         "give a student.pt written by `smskd-fast train` or `smskd-fast train-teacher`")
    if expected_name is not None and entry.get("model") != expected_name:
        raise ValueError(f"{path} holds model {entry.get('model')!r}, but the config names {expected_name!r}; "
                         f"name {entry.get('model')!r} in the config or give a {expected_name!r} model file")
    return entry


def load_weights(model: nn.Module, state_dict: Dict[str, Any], source: str,
                 remedy: str = "give weights saved for this model") -> None:
    """model.load_state_dict(state_dict) with a one-line error that says where the weights came from."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0] if lines else "")[:160]
        raise ValueError(f"the weights in {source} do not fit the model they are loaded into (saved for another "
                         f"architecture, class count or method set); {remedy}. First difference: {first}") from None


def append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The records of a JSON-lines file. A last line without its newline is an append cut short
    by a kill: it is dropped (append_jsonl writes each line with its newline in one call)."""
    if not path.is_file():
        return []
    with open(path) as handle:
        lines = handle.readlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}, line {number}, is not valid JSON; the file was edited or damaged") from None
    return records


def write_jsonl(path: Path, records: Iterable[Dict[str, Any]]) -> None:
    """A whole JSON-lines file, replaced atomically (atomic_io.write_atomic)."""
    write_bytes_atomic(path, "".join(json.dumps(record) + "\n" for record in records).encode())


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal and enabled."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.count = total, label, 0
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.monotonic()

    def step(self, note: str = "") -> None:
        self.count += 1
        if self.enabled:
            width = 24
            filled = int(width * self.count / max(self.total, 1))
            rate = self.count / max(time.monotonic() - self.start, 1e-9)
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{self.count}/{self.total} {rate:.1f} it/s {note}\033[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
