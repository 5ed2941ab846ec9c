"""Stopping at a stage boundary or mid-stage and resuming ends with the same weights on the CPU."""
from __future__ import annotations

import pytest
import torch

from smskd_fast.training.run_files import read_jsonl
from smskd_fast.training.trainer import SMSKDTrainer
from trainer_helpers import tiny_config, write_teacher

# Stage 2 uses CRD: its embedding heads, memory banks and SGD momentum must all survive a resume.
STAGES = [{"method": "kd", "epochs": 2},
          {"method": {"name": "crd", "params": {"feat_dim": 16, "nce_k": 32}}, "epochs": 2}]


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    teacher = write_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    config = tiny_config(teacher, STAGES)
    trainer = SMSKDTrainer(config, tmp_path_factory.mktemp("uninterrupted") / "run", log=_quiet)
    summary = trainer.run()
    return config, trainer.student.state_dict(), summary, read_jsonl(trainer.run_dir / "metrics.jsonl")


@pytest.mark.parametrize("stop_after, drop_stage_file", [
    (1, False),  # mid-stage 1
    (2, False),  # at the stage boundary
    (2, True),   # at the boundary, stopped before the stage checkpoint was written
    (3, False),  # mid-stage 2 (CRD state and optimizer restored from latest.pt)
])
def test_resume_gives_the_same_final_weights(setup, tmp_path, stop_after, drop_stage_file):
    config, expected_state, expected_summary, expected_records = setup
    run_dir = tmp_path / "run"
    assert SMSKDTrainer(config, run_dir, log=_quiet).run(max_epochs=stop_after) is None
    if drop_stage_file:
        (run_dir / "checkpoints" / "stage1.pt").unlink()
    resumed = SMSKDTrainer(config, run_dir, log=_quiet)
    summary = resumed.run(resume=True)
    state = resumed.student.state_dict()
    assert state.keys() == expected_state.keys()
    for key in expected_state:
        assert torch.equal(state[key], expected_state[key]), key
    assert summary["last_test_acc"] == expected_summary["last_test_acc"]
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["global_epoch"] for r in records] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in expected_records]


def test_metrics_written_after_the_last_checkpoint_are_dropped_on_resume(setup, tmp_path):
    config, expected_state, _, _ = setup
    run_dir = tmp_path / "run"
    SMSKDTrainer(config, run_dir, log=_quiet).run(max_epochs=3)
    with open(run_dir / "metrics.jsonl", "a") as handle:  # as if killed between the two writes of epoch 4
        handle.write('{"global_epoch": 4, "stage_name": "stale", "test_acc": 0.0}\n')
    resumed = SMSKDTrainer(config, run_dir, log=_quiet)
    resumed.run(resume=True)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["global_epoch"] for r in records] == [1, 2, 3, 4]
    assert "stale" not in {r["stage_name"] for r in records}


def test_resume_without_a_checkpoint_is_an_error(setup, tmp_path):
    config = setup[0]
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        SMSKDTrainer(config, tmp_path / "empty", log=_quiet).run(resume=True)
