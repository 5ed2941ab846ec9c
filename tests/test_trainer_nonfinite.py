"""A NaN or inf training loss: `nonfinite: stop` names where it happened, `skip` drops the step and counts it.

The NaN is injected by a forward pre-hook that turns the student's input images into NaN on one
chosen training step, so BatchNorm statistics are poisoned by the forward pass as well; a skipped
step must leave parameters, BatchNorm buffers and optimizer state as they were.
"""
from __future__ import annotations

import math

import pytest
import torch

from smskd_fast.training.nonfinite import NonFiniteLossError
from smskd_fast.training.run_files import read_jsonl
from smskd_fast.training.seeds import derive_seed
from smskd_fast.training.trainer import SMSKDTrainer
from trainer_helpers import tiny_config, write_teacher

BATCH, TRAIN = 32, 96  # trainer_helpers' tiny digits run: 3 steps per epoch
STEPS = TRAIN // BATCH


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def _stages(policy: str):
    return [{"method": "kd", "epochs": 1}, {"method": "sp", "epochs": 2, "nonfinite": policy}]


class NaNInjector:
    """Makes the student's input NaN on the chosen training calls (1-based); records the state before each."""

    def __init__(self, model: torch.nn.Module, poisoned_calls):
        self.poisoned, self.calls, self.states = set(poisoned_calls), 0, {}
        model.register_forward_pre_hook(self._hook)
        self.model = model

    def _hook(self, module, inputs):
        if not module.training:  # the probe batch and evaluation run in eval mode
            return None
        self.calls += 1
        self.states[self.calls] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if self.calls in self.poisoned:
            return (inputs[0] * float("nan"),)
        return None


def _expected_samples(seed: int, stage: int, epoch: int, step: int):
    """The batch the trainer draws: its order comes from a generator seeded by (seed, stage, epoch)."""
    order = torch.randperm(TRAIN, generator=torch.Generator().manual_seed(derive_seed(seed, stage, epoch, "data")))
    return order[(step - 1) * BATCH: step * BATCH].tolist()


def test_stop_names_stage_epoch_step_and_samples(teacher, tmp_path):
    config = tiny_config(teacher, _stages("stop"))
    trainer = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None)
    NaNInjector(trainer.student, [STEPS + 2])  # stage 2, epoch 1, step 2
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.run()
    message = str(caught.value)
    assert "stage2_sp (stage 2 of 2), epoch 1/2, step 2/3: the loss is nan" in message
    samples = _expected_samples(config.seed, 1, 0, 2)
    assert "[" + ", ".join(map(str, samples)) + "]" in message
    assert "nonfinite: skip" in message and "--set stages.1.nonfinite=skip" in message
    # the run stopped with its last checkpoint intact: stage 1 done, nothing of stage 2 trained
    latest = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert (latest["stage"], latest["epochs_done"]) == (0, 1)
    assert all(torch.isfinite(v).all() for v in latest["student"].values() if v.is_floating_point())


def test_skip_drops_the_step_restores_buffers_and_counts_it(teacher, tmp_path):
    config = tiny_config(teacher, _stages("skip"))
    logged = []
    trainer = SMSKDTrainer(config, tmp_path / "run", log=logged.append)
    poisoned = STEPS + 2
    injector = NaNInjector(trainer.student, [poisoned])
    summary = trainer.run()
    assert injector.calls == STEPS * 3
    before, after = injector.states[poisoned], injector.states[poisoned + 1]
    assert any(k.endswith("running_mean") for k in before)  # BatchNorm statistics are part of the check
    for key in before:  # no optimizer step, and the NaN batch's BatchNorm statistics were rolled back
        assert torch.equal(before[key], after[key]), key
    changed = injector.states[poisoned + 2]  # the next step trains again
    assert any(not torch.equal(after[k], changed[k]) for k in after)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["train_skipped_steps"] for r in records] == [0, 1, 0]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) for r in records)
    assert summary["skipped_steps"] == 1
    assert [s["skipped_steps"] for s in summary["stages"]] == [0, 1]
    assert any(line.startswith("skipped: stage2_sp (stage 2 of 2), epoch 1/2, step 2/3") for line in logged)
    for value in trainer.student.state_dict().values():
        if value.is_floating_point():
            assert torch.isfinite(value).all()


def test_skip_stops_when_every_step_of_an_epoch_is_non_finite(teacher, tmp_path):
    config = tiny_config(teacher, _stages("skip"))
    trainer = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None)
    NaNInjector(trainer.student, range(STEPS + 1, STEPS + 10))
    with pytest.raises(NonFiniteLossError, match="non-finite on every one of the 3 steps"):
        trainer.run()


def test_stop_is_the_default_and_the_policy_is_validated(teacher):
    from smskd_fast.training.config import ConfigError

    assert tiny_config(teacher, [{"method": "kd", "epochs": 1}]).stages[0].nonfinite == "stop"
    with pytest.raises(ConfigError, match=r"stages\[0\].nonfinite: must be one of \['stop', 'skip'\]"):
        tiny_config(teacher, [{"method": "kd", "epochs": 1, "nonfinite": "ignore"}])
