"""RunCheckpoints (training/checkpoint.py): latest.pt and stageK.pt round trips and resume repair."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from smskd_fast.training.checkpoint import RunCheckpoints


def _trained(seed: int):
    torch.manual_seed(seed)
    student, methods = nn.Linear(4, 3), nn.ModuleList([nn.Linear(3, 2)])
    optimizer = torch.optim.SGD(list(student.parameters()) + list(methods.parameters()), lr=0.1, momentum=0.9)
    sum(m(student(torch.randn(5, 4))).sum() for m in methods).backward()
    optimizer.step()  # the momentum buffers are now part of the optimizer state
    return student, methods, optimizer


def _equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_inside_a_stage_restores_student_methods_and_optimizer(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, torch.device("cpu"), is_main=True)
    student, methods, optimizer = _trained(0)
    checkpoints.save_latest(1, 2, 5, student, methods, optimizer, {"stage1": [1.0, 2.0]})

    fresh_student, fresh_methods, fresh_optimizer = _trained(1)
    point = checkpoints.resume(fresh_student, [3, 4])
    assert (point.stage, point.epoch, point.global_epoch, point.histograms) == (1, 2, 5, {"stage1": [1.0, 2.0]})
    assert _equal(fresh_student, student)
    assert point.restore_stage(0, fresh_methods, fresh_optimizer, "latest.pt") == 0  # not the stopped stage
    assert not _equal(fresh_methods, methods)
    assert point.restore_stage(1, fresh_methods, fresh_optimizer, "latest.pt") == 2
    assert _equal(fresh_methods, methods)
    assert str(fresh_optimizer.state_dict()) == str(optimizer.state_dict())


def test_a_stage_file_lost_to_a_kill_between_the_two_writes_is_rebuilt(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, torch.device("cpu"), is_main=True)
    student, methods, optimizer = _trained(0)
    checkpoints.save_latest(0, 3, 3, student, methods, optimizer, {})  # stage 1 done, stage1.pt not yet written
    point = checkpoints.resume(_trained(1)[0], [3, 4])
    assert (point.stage, point.epoch, point.latest) == (1, 0, None)
    stage_file = checkpoints.load_stage(0)
    assert stage_file["stage"] == 0
    assert all(torch.equal(stage_file["student"][k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(stage_file["methods"][k], v) for k, v in methods.state_dict().items())
    _, fresh_methods, fresh_optimizer = _trained(1)
    assert point.restore_stage(1, fresh_methods, fresh_optimizer, "latest.pt") == 0
    assert not _equal(fresh_methods, methods)  # a new stage starts with new methods


def test_only_the_main_process_writes(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, torch.device("cpu"), is_main=False)
    student, methods, optimizer = _trained(0)
    checkpoints.save_latest(0, 1, 1, student, methods, optimizer, {})
    checkpoints.save_stage(0, student.state_dict(), methods.state_dict())
    assert not (tmp_path / "checkpoints").exists()


def test_resume_errors_name_the_file(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, torch.device("cpu"), is_main=True)
    with pytest.raises(FileNotFoundError, match="latest.pt not found"):
        checkpoints.resume(nn.Linear(4, 3), [1])
    checkpoints.latest_path.parent.mkdir(parents=True)
    checkpoints.latest_path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="latest.pt is unreadable"):
        checkpoints.resume(nn.Linear(4, 3), [1])
