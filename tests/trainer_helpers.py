"""Tiny digits runs shared by the trainer tests (a few batches per epoch, seconds per run)."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Dict, List

import torch

from smskd_fast.training.config import parse_config
from smskd_fast.training.models import build_model
import smskd_fast.training.frozen_models as frozen_models_module
import smskd_fast.training.steps as steps_module
from smskd_fast.training.checkpoint import save_model_file


def write_teacher(path: Path, seed: int = 0) -> Path:
    """A digits teacher file: a briefly fitted digits_cnn_large (its TCP values vary per sample)."""
    from smskd_fast.training.data import load_splits

    torch.manual_seed(seed)
    teacher = build_model("digits_cnn_large", 10, 1)
    train = load_splits("digits").train
    images, labels = train.batch(torch.arange(128))
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(teacher(train.normalize(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_model_file(teacher, "digits_cnn_large", 10, 1, path)
    return path


def tiny_raw(teacher_file: Path, stages: List[Dict[str, Any]], **changes: Any) -> Dict[str, Any]:
    raw = {
        "seed": 1,
        "plots": False,
        "progress": False,
        "backend": "auto",
        "threads": 1,
        "data": {"name": "digits", "batch_size": 32, "train_subset": 96, "test_subset": 64,
                 "augment": "crop", "crop_padding": 1},
        "student": {"name": "digits_cnn_small"},
        "teacher": {"name": "digits_cnn_large", "checkpoint": str(teacher_file)},
        "defaults": {"optimizer": {"lr": 0.05}, "schedule": {"name": "cosine"}},
        "stages": stages,
    }
    raw.update(changes)
    return raw


def tiny_config(teacher_file: Path, stages: List[Dict[str, Any]], **changes: Any):
    return parse_config(tiny_raw(teacher_file, stages, **changes))


def count_teacher_calls(monkeypatch) -> List[bool]:
    """Counts forward calls of every trainer's teacher (a hook added when the teacher is loaded).

    Each call appends whether it ran in inference mode (cache builds do; probes and evaluation do not).
    """
    calls: List[bool] = []
    load = frozen_models_module.load_teacher

    def load_and_hook(*args, **kwargs):
        teacher = load(*args, **kwargs)
        teacher.register_forward_hook(lambda *_: calls.append(torch.is_inference_mode_enabled()))
        return teacher

    monkeypatch.setattr(frozen_models_module, "load_teacher", load_and_hook)
    return calls


def record_loss_calls(monkeypatch) -> List[tuple]:
    """Records (teacher, teacher_topk, weighting) of every smskd_loss call the trainer makes; the loss still runs."""
    seen: List[tuple] = []
    original = steps_module.smskd_loss

    def spy(*args, **kwargs):
        seen.append((args[2], kwargs.get("teacher_topk"), kwargs["weighting"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(steps_module, "smskd_loss", spy)
    return seen


def record_frozen_checks(monkeypatch) -> List[tuple]:
    """Records (stage name, reference model) at every frozen-model check the trainer makes; the check still runs."""
    seen: List[tuple] = []
    original = frozen_models_module.StageFrozenModels.check_unchanged

    def spy(self, name):
        seen.append((name, self.reference))
        original(self, name)

    monkeypatch.setattr(frozen_models_module.StageFrozenModels, "check_unchanged", spy)
    return seen


class DiskFullAfter:
    """A file whose writes fail with ENOSPC once `budget` bytes were written (some bytes do land)."""

    def __init__(self, handle, budget: int):
        self.handle, self.budget, self.name = handle, budget, handle.name

    def write(self, data) -> int:
        if len(data) > self.budget:
            self.handle.write(bytes(data[: self.budget]))
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()
