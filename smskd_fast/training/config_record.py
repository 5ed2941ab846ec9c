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

from smskd_fast.training.config import ConfigError, RunConfig, config_to_dict, parse_config

__all__ = ["RESULT_NEUTRAL_KEYS", "config_differences", "changes_since_written"]

# Keys (dotted paths) that change how a run reports, where it finds its files or how fast it goes, not
# what it trains: the data folder, the evaluation batch, a cache's folder and layout.
RESULT_NEUTRAL_KEYS = ("progress", "plots", "threads", "data.root", "data.eval_batch_size",
                       *(f"cache.{model}.{key}" for model in ("teacher", "reference")
                         for key in ("dir", "shard_rows", "batch_size")))


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


def _plain(config: RunConfig, ignore: Sequence[str]) -> Any:
    """config as plain data (as config.yaml holds it) without the dotted paths in `ignore`."""
    plain = yaml.safe_load(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    for path in ignore:
        *parents, last = path.split(".")
        node = plain
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return plain


def changes_since_written(run_dir: Path, config: RunConfig, ignore: Sequence[str] = RESULT_NEUTRAL_KEYS) -> List[str]:
    """How `config` differs from run_dir/config.yaml (none when the run has not written one yet), leaving
    out the dotted paths in `ignore`. The stored config is read as a config first, so that a key it lacks
    (written before the key existed) counts as its default."""
    stored_file = Path(run_dir) / "config.yaml"
    if not stored_file.is_file():
        return []
    try:
        stored = parse_config(yaml.safe_load(stored_file.read_text()) or {})
    except ConfigError as error:
        raise ConfigError(f"{stored_file} is not a config this version reads ({error})") from None
    return config_differences(_plain(stored, ignore), _plain(config, ignore))
