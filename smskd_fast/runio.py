"""Run-directory I/O: atomic checkpoints, model files, JSON-lines metrics, a terminal progress bar."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

__all__ = ["save_atomic", "save_model_file", "load_model_file", "append_jsonl", "read_jsonl", "Progress"]


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then os.replace: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


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
    entry = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(entry, dict) or "state_dict" not in entry:
        raise ValueError(f"{path} is not a smskd-fast model file (no 'state_dict')")
    if expected_name is not None and entry.get("model") != expected_name:
        raise ValueError(f"{path} holds model {entry.get('model')!r}, but the config names {expected_name!r}")
    return entry


def append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, records: Iterable[Dict[str, Any]]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(temporary, path)


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
