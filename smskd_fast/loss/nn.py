"""Drop-in nn.Module wrappers of the functional losses."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from smskd_fast.loss.functional import SMSKDLossOutput, kd_loss, smskd_loss


class SMSKDLoss(nn.Module):
    """Module form of smskd_fast.smskd_loss; keywords are fixed at construction."""

    def __init__(self, *, temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 ref_weight: float = 1.0, weighting: str = "inverse_tcp", ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.options = dict(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
                            ref_weight=ref_weight, weighting=weighting, ignore_index=ignore_index,
                            reduction=reduction, backend=backend)

    def forward(self, student_logits: torch.Tensor, target: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None,
                reference_logits: Optional[torch.Tensor] = None) -> SMSKDLossOutput:
        return smskd_loss(student_logits, target, teacher_logits, reference_logits, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class KDLoss(nn.Module):
    """Module form of smskd_fast.kd_loss (Hinton's T^2-scaled softened KL)."""

    def __init__(self, *, temperature: float = 4.0, reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.options = dict(temperature=temperature, reduction=reduction, backend=backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
