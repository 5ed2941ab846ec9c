"""Seeds derived from the run seed and a path such as (stage, epoch): what makes runs reproducible
and resumable (each epoch's randomness depends on where it is in the run, not on what ran before)."""
from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["derive_seed"]


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed determined by the run seed and a path such as (stage, epoch)."""
    digest = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
