"""The public functional loss API (SPEC.md section 4) and its dispatch to backends.

This module validates the arguments, flattens (..., C) logits to rows, hands the
rows to the chosen backend and applies the reduction. Backends only ever see
2-D rows and validated options.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from smskd_fast.loss import validation
from smskd_fast.backends import resolve_backend
from smskd_fast.backends.base import LossOptions, RowInputs, RowOutputs
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.ops.schema import accumulation_dtype

__all__ = ["SMSKDLossOutput", "smskd_loss", "kd_loss", "true_class_probability"]


@dataclass
class SMSKDLossOutput:
    """Result of smskd_loss.

    loss is differentiable with respect to student_logits only. ce, kd and ref
    are the unweighted terms (ref includes each row's weight), reduced like
    loss and detached. tcp and weight are per row with the target's shape.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    ref: torch.Tensor
    tcp: torch.Tensor
    weight: torch.Tensor


def _rows(logits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(..., C) logits as (N, C) rows (2-D ones as they are)."""
    if logits is None or logits.dim() == 2:
        return logits
    return logits.reshape(-1, logits.shape[-1])


def _reduce(values: torch.Tensor, mean_scale: Optional[torch.Tensor], reduction: str,
            leading: tuple) -> torch.Tensor:
    """Per row, sum, or mean: the sum times mean_scale (1 / the number of valid rows)."""
    if reduction == "none":
        return values.reshape(leading)
    total = values.sum()
    return total if reduction == "sum" else total * mean_scale


def _reduce_terms(rows: RowOutputs, mean_scale: Optional[torch.Tensor], reduction: str,
                  leading: tuple) -> tuple:
    """ce, kd and ref reduced like the loss, in one reduction over the three (3 operations instead of 6:
    at small C each operation's launch, not its work, is the cost)."""
    if reduction == "none":
        return tuple(values.reshape(leading) for values in (rows.ce, rows.kd, rows.ref))
    totals = torch.stack((rows.ce, rows.kd, rows.ref)).sum(dim=1)
    return (totals if reduction == "sum" else totals.mul_(mean_scale)).unbind()


def mean_reduction_scale(valid_rows: Union[torch.Tensor, int], student: torch.Tensor) -> torch.Tensor:
    """1 / max(number of valid rows, 1) as a 0-d tensor in the accumulation dtype on the student's device.

    valid_rows is the rows' boolean mask (counted on the device: no synchronisation) or their number.
    "mean" (here and in fused_linear) multiplies the sum by it, and the backends fold
    the same tensor into the gradient they write (RowInputs.grad_scale), so that
    backward has no N x C pass left when grad_output is 1.
    """
    acc = accumulation_dtype(student.dtype)
    if isinstance(valid_rows, int):
        return torch.full((), 1.0 / max(valid_rows, 1), dtype=acc, device=student.device)
    # Counted in acc directly (one operation fewer per call) while every partial sum is an exact
    # integer: up to 2 / eps = 2^24 rows in float32.
    exact = valid_rows.numel() <= 2 / torch.finfo(acc).eps
    count = valid_rows.sum(dtype=acc) if exact else valid_rows.sum().to(acc)
    return count.clamp_(min=1).reciprocal_()


def _run(
    student_logits: torch.Tensor,
    target: Optional[torch.Tensor],
    teacher_logits: Optional[torch.Tensor],
    reference_logits: Optional[torch.Tensor],
    options: LossOptions,
    backend: str,
    teacher_topk: Optional[TopKTeacher] = None,
    grad_scale: Optional[torch.Tensor] = None,
) -> RowOutputs:
    inputs = RowInputs(
        student=_rows(student_logits),
        target=None if target is None else target.reshape(-1),
        teacher=_rows(teacher_logits),
        reference=_rows(reference_logits),
        teacher_topk=None if teacher_topk is None else teacher_topk.rows(),
        grad_scale=grad_scale,
    )
    chosen = resolve_backend(backend, student_logits.device, student_logits.dtype, student_logits.shape[-1],
                             topk=teacher_topk is not None)
    return chosen.rows(inputs, options)


def smskd_loss(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    reference_logits: Optional[torch.Tensor] = None,
    *,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    ref_weight: float = 1.0,
    weighting: str = "inverse_tcp",
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    overwrite_student_logits: bool = False,
    teacher_topk: Optional[TopKTeacher] = None,
) -> SMSKDLossOutput:
    """CE + KD to the teacher + TCP-weighted KL to the reference, fused per row.

    L_i = ce_weight*CE_i + kd_weight*T^2*KL(p_t||p_s) + ref_weight*T^2*w_i*KL(p_r||p_s)
    with p = softmax(logits/T) and w_i from the teacher's true-class probability
    (SPEC.md section 2). Logits have shape (..., C), target the leading shape.
    Rows whose target is ignore_index count for nothing; "mean" divides by the
    number of other rows and is 0 (not NaN) when there are none.
    overwrite_student_logits=True lets a GPU backend store the gradient in the
    student logits' memory instead of a new N x C buffer; their values are then
    lost, so allow it only when nothing reads them after this call.
    teacher_topk (instead of teacher_logits) gives the teacher in the top-k form
    of a logit cache; TCP stays exact and KD follows smskd_fast/backends/topk.py.
    """
    validation.check_logits("student_logits", student_logits)
    validation.check_companion_logits("teacher_logits", teacher_logits, student_logits)
    validation.check_companion_logits("reference_logits", reference_logits, student_logits)
    # The target's values are checked by the backend (the compiled ops, the reference, the Triton
    # launcher on the CPU; device assertions on CUDA): on the CPU a second check cost ~10 us per call.
    validation.check_target(target, student_logits, ignore_index, values=False)
    validation.check_options(
        temperature, reduction, weighting,
        {"ce_weight": ce_weight, "kd_weight": kd_weight, "ref_weight": ref_weight},
    )
    validation.check_teacher_topk(teacher_topk, teacher_logits, student_logits, temperature)
    validation.check_weighting_has_tcp(weighting, teacher_logits if teacher_topk is None else teacher_topk,
                                       reference_logits)
    options = LossOptions(float(temperature), float(ce_weight), float(kd_weight), float(ref_weight),
                          weighting, int(ignore_index), bool(overwrite_student_logits))
    mean_scale = mean_reduction_scale(target != ignore_index, student_logits) if reduction == "mean" else None
    rows = _run(student_logits, target, teacher_logits, reference_logits, options, backend, teacher_topk,
                grad_scale=mean_scale)

    leading = tuple(target.shape)
    ce, kd, ref = _reduce_terms(rows, mean_scale, reduction, leading)
    return SMSKDLossOutput(
        loss=_reduce(rows.loss, mean_scale, reduction, leading),
        ce=ce,
        kd=kd,
        ref=ref,
        tcp=rows.tcp.reshape(leading),
        weight=rows.weight.reshape(leading),
    )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 4.0,
    reduction: str = "mean",
    backend: str = "auto",
    overwrite_student_logits: bool = False,
) -> torch.Tensor:
    """Hinton's KD term alone: T^2 * KL(softmax(t/T) || softmax(s/T)) per row.

    "mean" averages over rows (all leading dimensions flattened), which for 2-D
    logits equals T^2 * F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean").
    """
    validation.check_logits("student_logits", student_logits)
    if teacher_logits is None:
        raise ValueError("teacher_logits must be a tensor for kd_loss, got None")
    validation.check_companion_logits("teacher_logits", teacher_logits, student_logits)
    validation.check_options(temperature, reduction, "constant", {})
    options = LossOptions(float(temperature), ce_weight=0.0, kd_weight=1.0, ref_weight=0.0,
                          weighting="constant", overwrite_student_logits=bool(overwrite_student_logits))
    leading = tuple(student_logits.shape[:-1])
    mean_scale = mean_reduction_scale(math.prod(leading), student_logits) if reduction == "mean" else None
    rows = _run(student_logits, None, teacher_logits, None, options, backend, grad_scale=mean_scale)
    return _reduce(rows.loss, mean_scale, reduction, leading)


@torch.no_grad()
def true_class_probability(teacher_logits: torch.Tensor, target: torch.Tensor,
                           *, ignore_index: int = -100) -> torch.Tensor:
    """TCP_i = softmax(t_i)[y_i] at temperature 1, in float32 (float64 for float64 input); 0 on ignored rows."""
    validation.check_logits("teacher_logits", teacher_logits)
    validation.check_target(target, teacher_logits, ignore_index)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long().unsqueeze(-1)
    acc = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    tcp = torch.softmax(teacher_logits.to(acc), dim=-1).gather(-1, safe_target).squeeze(-1)
    return torch.where(valid, tcp, torch.zeros_like(tcp))
