"""The SMSKD stage machinery end to end, against independent oracles.

Each step of a tiny digits run is recorded (its inputs, the frozen models' logits the loss got, the
optimizer's state) and checked: the reference of stage k is the student as stage k-1 ended it (weights
and BatchNorm statistics, run in eval mode), a stage without a reference has none, the loss is SPEC.md
section 2 in float64 (tests/closed_form.py) with the stage's T, weights and weighting, TCP comes from the
teacher at temperature 1, and every stage starts a fresh optimizer under the run's LR schedule.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

import smskd_fast.training.steps as steps_module
import smskd_fast.training.trainer as trainer_module
from closed_form import closed_form
from smskd_fast.training.models import build_model
from smskd_fast.training.trainer import SMSKDTrainer
from trainer_helpers import tiny_config, write_teacher


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def _record_steps(monkeypatch) -> List[Dict[str, Any]]:
    """Per training step: the stage index (by stage object), inputs, target, the smskd_loss call's frozen
    logits, options and output, and the optimizer's state and learning rate before the step."""
    steps: List[Dict[str, Any]] = []
    step_for = trainer_module.step_for

    def recording_step_for(stage):
        step = step_for(stage)

        def recorded(student, state, stage_config, backend, epoch, inputs, target, indices):
            steps.append({"stage": stage_config, "inputs": inputs.clone(), "target": target.clone(),
                          "optimizer_state_size": len(state.optimizer.state),
                          "lr": state.optimizer.param_groups[0]["lr"],
                          "fused_kd_weight": state.fused_kd_weight, "has_reference": state.frozen.reference is not None})
            return step(student, state, stage_config, backend, epoch, inputs, target, indices)

        return recorded

    loss = steps_module.smskd_loss

    def recording_loss(student, target, teacher, reference, **options):
        out = loss(student, target, teacher, reference, **options)
        steps[-1].update(student_logits=student.detach().clone(), teacher_logits=teacher, reference_logits=reference,
                         options=options, out=out)
        return out

    monkeypatch.setattr(trainer_module, "step_for", recording_step_for)
    monkeypatch.setattr(steps_module, "smskd_loss", recording_loss)
    return steps


def _stage_model(run: Path, stage_number: int) -> torch.nn.Module:
    """The student as stage `stage_number` (1-based) ended it, from its stage file, in eval mode."""
    model = build_model("digits_cnn_small", 10, 1).double()
    state = torch.load(run / "checkpoints" / f"stage{stage_number}.pt", weights_only=True)["student"]
    model.load_state_dict(state)
    return model.eval()


def test_three_stages_reference_loss_and_optimizer_against_oracles(teacher_file, tmp_path, monkeypatch):
    """Stage 2 switches its reference off, so stage 3's reference is stage 2's end (not stage 1's)."""
    stages = [{"method": "kd", "epochs": 1},
              {"method": {"name": "kd", "weight": 0.5}, "epochs": 1, "reference": False},
              {"method": {"name": "kd", "weight": 0.7}, "epochs": 1, "weighting": "tcp", "temperature": 3.0,
               "ce_weight": 0.6, "ref_weight": 1.7}]
    config = tiny_config(teacher_file, stages, schedule_scope="run")
    steps = _record_steps(monkeypatch)
    trainer = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None)
    trainer.run()
    assert len(steps) == 9  # 96 samples / batch 32, three stages of one epoch

    by_stage = [steps[0:3], steps[3:6], steps[6:9]]
    for index, stage_steps in enumerate(by_stage):
        assert all(step["stage"] is config.stages[index] for step in stage_steps)
        assert stage_steps[0]["optimizer_state_size"] == 0  # a fresh optimizer: no momentum carried over
        assert stage_steps[1]["optimizer_state_size"] > 0
        # schedule_scope run: cosine over the 3 epochs of the run, lr 0.05
        assert all(step["lr"] == pytest.approx(0.5 * 0.05 * (1 + math.cos(math.pi * index / 3)), rel=1e-12)
                   for step in stage_steps)
    assert not any(step["has_reference"] or step["reference_logits"] is not None for step in steps[:6])
    assert all(step["options"]["ref_weight"] == 0.0 for step in steps[:6])

    teacher = build_model("digits_cnn_large", 10, 1).double()
    teacher.load_state_dict(trainer.teacher.state_dict())
    teacher.eval()
    reference = _stage_model(tmp_path / "run", 2)
    stage1_end = _stage_model(tmp_path / "run", 1)
    for step in by_stage[2]:
        inputs, target = step["inputs"].double(), step["target"].numpy()
        with torch.no_grad():
            expected_reference, expected_teacher = reference(inputs), teacher(inputs)
            stage1_logits = stage1_end(inputs)
        assert step["has_reference"]
        # the reference is stage 2's end, weights and BatchNorm statistics, in eval mode
        np.testing.assert_allclose(step["reference_logits"].double().numpy(), expected_reference.numpy(),
                                   rtol=0, atol=1e-5)
        assert (step["reference_logits"].double() - stage1_logits).abs().max() > 1e-3  # not stage 1's
        np.testing.assert_allclose(step["teacher_logits"].double().numpy(), expected_teacher.numpy(), rtol=0,
                                   atol=1e-5)
        assert step["fused_kd_weight"] == pytest.approx(0.7)
        expected, _ = closed_form(step["student_logits"].double().numpy(), target, expected_teacher.numpy(),
                                  expected_reference.numpy(), T=3.0, ce_weight=0.6, kd_weight=0.7, ref_weight=1.7,
                                  weighting="tcp")
        out = step["out"]
        # TCP of the teacher at temperature 1 on the true class; w_i = TCP_i for "tcp"
        np.testing.assert_allclose(out.tcp.double().numpy(), expected["tcp"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(out.weight.double().numpy(), expected["tcp"], rtol=0, atol=1e-6)
        assert float(out.ref) == pytest.approx(expected["ref"].mean(), rel=1e-4)
        assert float(out.loss.detach()) == pytest.approx(expected["loss"].mean(), rel=1e-5)


def test_a_resumed_stage_gets_the_same_reference(teacher_file, tmp_path, monkeypatch):
    """Stopped mid-stage 2 and resumed: the reference logits of every stage-2 step are those of the
    uninterrupted run (the reference is read from stage1.pt, not from the resumed student)."""
    stages = [{"method": "kd", "epochs": 1}, {"method": "kd", "epochs": 2}]
    config = tiny_config(teacher_file, stages)
    whole = _record_steps(monkeypatch)
    SMSKDTrainer(config, tmp_path / "whole", log=lambda _: None).run()
    assert SMSKDTrainer(config, tmp_path / "run", log=lambda _: None).run(max_epochs=2) is None
    whole_stage2_epoch2 = whole[6:9]
    whole.clear()
    SMSKDTrainer(config, tmp_path / "run", log=lambda _: None).run(resume=True)
    assert len(whole) == 3
    for resumed, expected in zip(whole, whole_stage2_epoch2):
        assert torch.equal(resumed["inputs"], expected["inputs"])
        assert torch.equal(resumed["reference_logits"], expected["reference_logits"])
        assert torch.equal(resumed["out"].weight, expected["out"].weight)
