"""A run's config.yaml against the config asked for now (smskd_fast/training/config_record.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from smskd_fast.training.config import ConfigError, config_to_dict, load_config
from smskd_fast.training.config_record import changes_since_written

DEMO = Path(__file__).resolve().parent.parent / "configs" / "digits_demo.yaml"


def _write_run(folder: Path, config, drop=()) -> Path:
    stored = config_to_dict(config)
    for key in drop:
        stored.pop(key)
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    return folder


def test_values_that_change_what_a_run_trains_are_named(tmp_path):
    run = _write_run(tmp_path / "run", load_config(DEMO))
    changed = load_config(DEMO, ["defaults.optimizer.lr=0.5", "stages.2.epochs=3"])
    assert changes_since_written(run, changed) == ["stages.0.optimizer.lr: 0.05 -> 0.5",
                                                   "stages.1.optimizer.lr: 0.05 -> 0.5",
                                                   "stages.2.epochs: 10 -> 3",
                                                   "stages.2.optimizer.lr: 0.05 -> 0.5"]


def test_where_files_are_and_how_fast_a_run_goes_are_not_another_config(tmp_path):
    run = _write_run(tmp_path / "run", load_config(DEMO))
    moved = load_config(DEMO, ["data.root=/elsewhere", "data.eval_batch_size=7", "threads=2", "plots=false",
                               "progress=false"])
    assert changes_since_written(run, moved) == []
    assert changes_since_written(run, moved, ignore=()) == [
        "data.root: None -> '/elsewhere'", "data.eval_batch_size: 256 -> 7", "threads: 1 -> 2",
        "progress: True -> False", "plots: True -> False"]


def test_a_key_the_stored_config_lacks_counts_as_its_default(tmp_path):
    """A run written before a key existed is the same config as one with that key at its default."""
    run = _write_run(tmp_path / "run", load_config(DEMO), drop=("schedule_scope",))
    assert "schedule_scope" not in yaml.safe_load((run / "config.yaml").read_text())
    assert changes_since_written(run, load_config(DEMO)) == []
    assert changes_since_written(run, load_config(DEMO, ["schedule_scope=run"])) == [
        "schedule_scope: 'stage' -> 'run'"]


def test_a_stored_config_this_version_cannot_read_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"stages": [], "student": {"name": "x"}, "bogus": 1}))
    with pytest.raises(ConfigError, match=r"run/config.yaml is not a config this version reads \(bogus: unknown key"):
        changes_since_written(run, load_config(DEMO))
