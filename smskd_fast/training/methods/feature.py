"""Feature-based methods: FitNet hints and attention transfer (AT)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from smskd_fast.training.methods.base import DistillMethod, MethodInputs, check_parameter


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average-pools the larger of two feature maps to the other's height and width."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    size = tuple(min(a, b) for a, b in zip(student.shape[-2:], teacher.shape[-2:]))
    return F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)


class FitNet(DistillMethod):
    """FitNets (Romero et al. 2015): weight * MSE(connector(student hint), teacher hint), with a
    1x1 conv + BatchNorm connector built to the teacher's channel count. relu=True appends a
    ReLU to the connector, as the regressor of RepDistiller and mdistiller does (their teacher
    hints are post-ReLU, non-negative); the default keeps the plain conv + BatchNorm."""

    name = "fitnet"
    layer_kind = "hint"
    default_weight = 100.0

    def __init__(self, weight=None, relu: bool = False):
        super().__init__(weight)
        self.relu = bool(relu)

    def build(self, inputs: MethodInputs, num_samples: int) -> None:
        self.connectors = nn.ModuleList()
        for student, teacher in self.feature_pairs(inputs):
            if student.dim() != 4 or teacher.dim() != 4:
                raise ValueError(f"FitNet needs (N, C, H, W) feature maps, got student {tuple(student.shape)} "
                                 f"and teacher {tuple(teacher.shape)}")
            layers = [nn.Conv2d(student.shape[1], teacher.shape[1], 1, bias=False), nn.BatchNorm2d(teacher.shape[1])]
            self.connectors.append(nn.Sequential(*layers, *([nn.ReLU()] if self.relu else [])))

    def loss(self, inputs: MethodInputs) -> torch.Tensor:
        total = inputs.student_logits.new_zeros(())
        for connector, (student, teacher) in zip(self.connectors, self.feature_pairs(inputs)):
            student, teacher = match_spatial(student, teacher)
            total = total + F.mse_loss(connector(student), teacher)
        return self.weight * total


def attention_map(features: torch.Tensor, power: float) -> torch.Tensor:
    """Spatial attention: mean over channels of |f|^p, flattened and L2-normalised per sample."""
    return F.normalize(features.abs().pow(power).mean(1).flatten(1), dim=1)


class AttentionTransfer(DistillMethod):
    """AT (Zagoruyko and Komodakis 2017): weight * sum over layer pairs of the mean squared
    difference of the normalised attention maps."""

    name = "at"
    layer_kind = "stages"
    default_weight = 1000.0

    def __init__(self, weight=None, power: float = 2.0):
        super().__init__(weight)
        self.power = float(power)
        check_parameter("at", "power", self.power, self.power > 0, "> 0")

    def loss(self, inputs: MethodInputs) -> torch.Tensor:
        total = inputs.student_logits.new_zeros(())
        for student, teacher in self.feature_pairs(inputs):
            student, teacher = match_spatial(student, teacher)
            total = total + (attention_map(student, self.power) - attention_map(teacher, self.power)).pow(2).mean()
        return self.weight * total
