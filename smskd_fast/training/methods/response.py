"""Response-based methods: Hinton's KD (fused into smskd_loss), DKD, and plain CE (no method)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from smskd_fast.training.methods.base import DistillMethod, MethodInputs, check_parameter


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
        check_parameter("dkd", "alpha", self.alpha, self.alpha >= 0, ">= 0")
        check_parameter("dkd", "beta", self.beta, self.beta >= 0, ">= 0")
        check_parameter("dkd", "temperature", self.temperature, self.temperature > 0, "> 0")
        check_parameter("dkd", "warmup", self.warmup, self.warmup >= 0, ">= 0 epochs (0: no warm-up)")

    def loss(self, inputs: MethodInputs) -> torch.Tensor:
        ramp = min((self.epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0
        return self.weight * ramp * dkd_loss(inputs.student_logits, inputs.teacher_logits, inputs.target,
                                             self.alpha, self.beta, self.temperature)


def dkd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD (batch mean, times T^2)."""
    gold = F.one_hot(target, student.shape[-1]).bool()
    # Binary (target, rest) distributions for TCKD, in log space.
    log_binary_student = binary_log_probs(student / temperature, gold)
    binary_teacher = binary_log_probs(teacher / temperature, gold).exp()
    tckd = F.kl_div(log_binary_student, binary_teacher, reduction="sum")
    # Distributions over the non-target classes for NCKD (target logit pushed far down).
    log_student_rest = F.log_softmax(student / temperature - 1000.0 * gold, dim=-1)
    teacher_rest = F.softmax(teacher / temperature - 1000.0 * gold, dim=-1)
    nckd = F.kl_div(log_student_rest, teacher_rest, reduction="sum")
    return (alpha * tckd + beta * nckd) * temperature ** 2 / student.shape[0]


def binary_log_probs(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """(log p_target, log(1 - p_target)) of softmax(logits) per row, from log-sum-exps.

    The rest's mass is summed over the non-target classes, not taken as 1 - p_target: in
    float32 that difference rounds to 0 once the rest's mass is below ~3e-8 (a target logit
    ~17 + ln(C - 1) above the others at T = 1), which lost TCKD's value and its gradient.
    """
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
    masked_out = torch.finfo(logits.dtype).min  # not -inf: a one-class row stays finite
    log_target = torch.logsumexp(logits.masked_fill(~gold, masked_out), dim=-1, keepdim=True)
    log_rest = torch.logsumexp(logits.masked_fill(gold, masked_out), dim=-1, keepdim=True)
    return torch.cat([log_target, log_rest], dim=-1) - log_total
