"""A run's config.yaml against the config asked for now: which values changed since it was written.

Stored results are reused (the demo, the study) and runs are resumed (`train --resume --set ...`)
by their directory: a directory trained with other values must not pass for this config's
results, and a resumed run's config.yaml must say what the rest of it trained with.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Sequence

import yaml

from smskd_fast.training.config import RunConfig, config_to_dict

__all__ = ["RESULT_NEUTRAL_KEYS", "config_differences", "changes_since_written"]

# Top-level keys that change how a run reports or how fast it goes, not what it trains.
RESULT_NEUTRAL_KEYS = ("progress", "plots", "threads")


def _same_path(old: Any, new: Any) -> bool:
    """Two strings naming one existing file or folder (a path relative to another working directory)."""
    if not (isinstance(old, str) and isinstance(new, str) and os.path.exists(old) and os.path.exists(new)):
        return False
    return os.path.samefile(old, new)


def config_differences(old: Any, new: Any, path: str = "") -> List[str]:
    """'key.path: old -> new' for every value of the plain-data config `new` that differs from `old`."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in list(old) + [key for key in new if key not in old]:
            key_path = f"{path}.{key}" if path else str(key)
            changes += config_differences(old.get(key), new.get(key), key_path)
        return changes
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [change for index, (a, b) in enumerate(zip(old, new))
                for change in config_differences(a, b, f"{path}.{index}")]
    if old == new or _same_path(old, new):
        return []
    return [f"{path}: {old!r} -> {new!r}"]


def changes_since_written(run_dir: Path, config: RunConfig, ignore: Sequence[str] = RESULT_NEUTRAL_KEYS) -> List[str]:
    """How `config` differs from run_dir/config.yaml (none when the run has not written one yet),
    leaving out the top-level keys in `ignore`."""
    stored_file = Path(run_dir) / "config.yaml"
    if not stored_file.is_file():
        return []
    stored = yaml.safe_load(stored_file.read_text()) or {}
    current = yaml.safe_load(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    for key in ignore:
        stored.pop(key, None)
        current.pop(key, None)
    return config_differences(stored, current)
