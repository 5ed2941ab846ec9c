"""Optimizer and learning-rate schedule registries: a config name -> the builder it stands for.

A stage's `optimizer.name` and `schedule.name` are looked up here (and config validation
checks them against these names), so adding an optimizer or a schedule is one entry in a
dict, and an unknown name fails with the argument and the known names.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, TypeVar

import torch
from torch import nn

from smskd_fast.training.config import OptimizerConfig, RunConfig, ScheduleConfig, StageConfig

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "learning_rate", "stage_learning_rate"]

OptimizerBuilder = Callable[[OptimizerConfig, List[nn.Parameter]], torch.optim.Optimizer]
# (base lr, schedule, position in the schedule, its length in epochs) -> the epoch's learning rate
Schedule = Callable[[float, ScheduleConfig, int, int], float]
Entry = TypeVar("Entry")


def _sgd(spec: OptimizerConfig, parameters: List[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                           nesterov=spec.nesterov)


def _adam(spec: OptimizerConfig, parameters: List[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=spec.lr, weight_decay=spec.weight_decay)


def _adamw(spec: OptimizerConfig, parameters: List[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=spec.lr, weight_decay=spec.weight_decay)


def _multistep(base: float, schedule: ScheduleConfig, position: int, length: int) -> float:
    return base * schedule.gamma ** sum(position >= milestone for milestone in schedule.milestones)


def _cosine(base: float, schedule: ScheduleConfig, position: int, length: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * position / length))


def _constant(base: float, schedule: ScheduleConfig, position: int, length: int) -> float:
    return base


OPTIMIZERS: Dict[str, OptimizerBuilder] = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}
SCHEDULES: Dict[str, Schedule] = {"multistep": _multistep, "cosine": _cosine, "constant": _constant}


def _lookup(registry: Dict[str, Entry], name: str, argument: str) -> Entry:
    """registry[name], or a ValueError naming `argument`, the bad name and the known names."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"{argument}: unknown name {name!r}; known names: {sorted(registry)}") from None


def build_optimizer(spec: OptimizerConfig, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer `spec.name` over `parameters`, with the spec's settings."""
    return _lookup(OPTIMIZERS, spec.name, "optimizer.name")(spec, list(parameters))


def learning_rate(stage: StageConfig, epoch: int, start: int = 0, span: Optional[int] = None) -> float:
    """The stage's learning rate for its 0-based epoch `epoch`.

    With schedule_scope "stage" (start 0, span the stage's epochs) every stage runs its
    schedule afresh; with "run" the stage's epoch is epoch `start + epoch` of one schedule
    spanning all `span` epochs of the run (cosine over the run, global milestones), the
    schedule a single-stage baseline of the same total epochs gets.
    """
    schedule = _lookup(SCHEDULES, stage.schedule.name, "schedule.name")
    return schedule(stage.optimizer.lr, stage.schedule, start + epoch, stage.epochs if span is None else span)


def stage_learning_rate(config: RunConfig, index: int, epoch: int) -> float:
    """learning_rate of stage `index`, epoch `epoch`, under the run's schedule_scope."""
    stage = config.stages[index]
    if config.schedule_scope == "run":
        return learning_rate(stage, epoch, sum(s.epochs for s in config.stages[:index]),
                             sum(s.epochs for s in config.stages))
    return learning_rate(stage, epoch)
