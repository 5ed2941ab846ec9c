"""A one-line terminal progress bar for training epochs (drawn only on a terminal)."""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


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
