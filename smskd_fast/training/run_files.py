"""The run directory's text files: config.yaml, summary.json and the like written atomically,
and metrics.jsonl, one JSON line appended per epoch (checkpoints are in checkpoint.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List

from smskd_fast.training.atomic_io import write_atomic_reported, write_bytes_atomic

__all__ = ["write_text_atomic", "append_jsonl", "read_jsonl", "write_jsonl"]


def write_text_atomic(path: Path, text: str) -> None:
    """A text file never seen half-written; a failed write raises CheckpointWriteError (atomic_io)."""
    write_atomic_reported(Path(path), lambda handle: handle.write(text.encode()))


def append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    """One JSON line, written with its newline in one call and fsynced (read_jsonl relies on it)."""
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
