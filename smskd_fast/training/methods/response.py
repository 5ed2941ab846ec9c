"""Response-based methods: Hinton's KD (fused into smskd_loss), DKD, and plain CE (no method)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from smskd_fast.training.methods.base import DistillMethod, MethodInputs


class NoDistillation(DistillMethod):
    """The student alone: cross-entropy only (the trainer's CE term), no teacher term."""

    name = "none"

    def loss(self, inputs: MethodInputs) -> torch.Tensor:
        return inputs.student_logits.new_zeros(())


class HintonKD(DistillMethod):
    """KD (Hinton et al. 2015): weight * T^2 * KL(softmax(t/T) || softmax(s/T)), computed
    by the fused smskd_loss kernel at the stage's temperature, so loss() adds nothing."""

    name = "kd"
    default_weight = 0.9

    @property
    def fused_kd_weight(self) -> float:
        return self.weight

    def loss(self, inputs: MethodInputs) -> torch.Tensor:
        return inputs.student_logits.new_zeros(())


class DKD(DistillMethod):
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD at temperature T,
    both T^2-scaled and averaged over the batch, ramped in linearly over `warmup` epochs."""

    name = "dkd"
    reads_teacher_logits = True

    def __init__(self, weight=None, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: int = 20):
        super().__init__(weight)
        self.alpha, self.beta, self.temperature, self.warmup = float(alpha), float(beta), float(temperature), int(warmup)

    def loss(self, inputs: MethodInputs) -> torch.Tensor:
        ramp = min((self.epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0
        return self.weight * ramp * dkd_loss(inputs.student_logits, inputs.teacher_logits, inputs.target,
                                             self.alpha, self.beta, self.temperature)


def dkd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD (batch mean, times T^2)."""
    gold = F.one_hot(target, student.shape[-1]).bool()
    p_student = torch.softmax(student / temperature, dim=-1)
    p_teacher = torch.softmax(teacher / temperature, dim=-1)
    # Binary (target, rest) distributions for TCKD.
    student_target = (p_student * gold).sum(-1)
    teacher_target = (p_teacher * gold).sum(-1)
    binary_student = torch.stack([student_target, 1 - student_target], dim=-1).clamp_min(1e-12)
    binary_teacher = torch.stack([teacher_target, 1 - teacher_target], dim=-1)
    tckd = F.kl_div(binary_student.log(), binary_teacher, reduction="sum")
    # Distributions over the non-target classes for NCKD (target logit pushed far down).
    log_student_rest = F.log_softmax(student / temperature - 1000.0 * gold, dim=-1)
    teacher_rest = F.softmax(teacher / temperature - 1000.0 * gold, dim=-1)
    nckd = F.kl_div(log_student_rest, teacher_rest, reduction="sum")
    return (alpha * tckd + beta * nckd) * temperature ** 2 / student.shape[0]
