"""What one stage trains, set up: its method modules, feature taps, optimizer and frozen models.

Methods are built under a seed derived from (run seed, stage), sized from the features of
the first training batch (a probe in eval mode, so no BatchNorm statistic moves), and
trained together with the student by one optimizer; under torchrun the student and the
methods are wrapped in one DDP (distributed.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from smskd_fast.training.config import RunConfig
from smskd_fast.training.data import ImageSet, TokenSet, iterate_batches
from smskd_fast.training.distributed import DistributedContext
from smskd_fast.training.frozen_models import FrozenModels, StageFrozenModels
from smskd_fast.training.methods import FeatureTaps, MethodInputs, build_method
from smskd_fast.training.optim import build_optimizer
from smskd_fast.training.seeds import derive_seed

__all__ = ["StageState", "build_methods", "check_methods", "build_stage"]


@dataclass
class StageState:
    """What one stage trains: its methods, optimizer, feature taps and frozen models."""

    methods: nn.ModuleList
    optimizer: torch.optim.Optimizer
    student_taps: FeatureTaps
    teacher_taps: Optional[FeatureTaps]
    student_forward: nn.Module  # the student, or DDP over the student and methods (distributed.py)
    frozen: StageFrozenModels

    @property
    def fused_kd_weight(self) -> float:
        """The Hinton-KD weight that the fused loss computes for the stage's methods."""
        return sum(method.fused_kd_weight for method in self.methods)

    def close(self) -> None:
        """Removes the feature hooks from the student and the teacher."""
        self.student_taps.remove()
        if self.teacher_taps is not None:
            self.teacher_taps.remove()


def build_methods(config: RunConfig, index: int, student: nn.Module, teacher: Optional[nn.Module]) -> nn.ModuleList:
    """The method modules of stage `index`, not yet built from a probe batch."""
    return nn.ModuleList([
        build_method(m.name, student, teacher, weight=m.weight, student_layers=m.student_layers,
                     teacher_layers=m.teacher_layers, params=m.params)
        for m in config.stages[index].methods
    ])


def check_methods(config: RunConfig, student: nn.Module, teacher: Optional[nn.Module]) -> None:
    """Builds every stage's methods and taps once, so bad parameters or layer names fail now, not stages later."""
    for index in range(len(config.stages)):
        for method in build_methods(config, index, student, teacher):
            FeatureTaps(student, method.student_layers, "student").remove()
            if teacher is not None:
                FeatureTaps(teacher, method.teacher_layers, "teacher").remove()


@torch.no_grad()
def _probe_inputs(student: nn.Module, teacher: Optional[nn.Module], train: Union[ImageSet, TokenSet],
                  batch_size: int, device: torch.device, student_taps: FeatureTaps,
                  teacher_taps: Optional[FeatureTaps]) -> MethodInputs:
    """Features of the first training batch (student in eval mode: its statistics stay untouched)."""
    images, labels, indices = next(iterate_batches(train, batch_size, shuffle=False))
    images = train.normalize(images).to(device)
    was_training = student.training
    student.eval()
    student_logits = student(images)
    teacher_logits = teacher(images) if teacher is not None else None
    student.train(was_training)
    return MethodInputs(student_logits, teacher_logits, labels.to(device), indices,
                        student_taps.take(), teacher_taps.take() if teacher_taps else {})


def build_stage(config: RunConfig, index: int, stage_name: str, student: nn.Module, frozen: FrozenModels,
                train: Union[ImageSet, TokenSet], device: torch.device, dist: DistributedContext,
                reference_weights: Optional[Dict[str, torch.Tensor]],
                build_student: Callable[[], nn.Module]) -> StageState:
    """Stage `index` ready to train: methods built and on `device`, optimizer, taps, frozen models
    (the reference loaded from `reference_weights`, None where the stage has none)."""
    teacher = frozen.teacher
    torch.manual_seed(derive_seed(config.seed, index, "methods"))
    methods = build_methods(config, index, student, teacher)
    student_taps = FeatureTaps(student, [n for m in methods for n in m.student_layers], "student")
    teacher_taps = (FeatureTaps(teacher, [n for m in methods for n in m.teacher_layers], "teacher")
                    if teacher is not None else None)
    probe = _probe_inputs(student, teacher, train, config.data.batch_size, device, student_taps, teacher_taps)
    for method in methods:
        method.build(probe, len(train))
    methods.to(device)
    stage_frozen = frozen.for_stage(index, stage_name, methods, reference_weights, build_student)
    optimizer = build_optimizer(config.stages[index].optimizer,
                                list(student.parameters()) + list(methods.parameters()))
    return StageState(methods, optimizer, student_taps, teacher_taps, dist.wrap(student, methods, device),
                      stage_frozen)
