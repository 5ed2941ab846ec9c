"""The public functional loss API (SPEC.md section 4) and its dispatch to backends.

This module validates the arguments, flattens (..., C) logits to rows and hands the
rows to the chosen backend, with the reduction for backends that reduce inside their
op (one dispatch for a mean loss), else reducing their per-row outputs here. Backends
only ever see 2-D rows and validated options.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from smskd_fast.loss import validation
from smskd_fast.loss.derivative_modes import backend_for_derivatives
from smskd_fast.backends import resolve_backend
from smskd_fast.backends.base import LossOptions, RowInputs, RowOutputs
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.ops.reduction import as_class_indices, reduce_per_row_outputs, reduction_grad_scale
from smskd_fast.ops.schema import PER_ROW_OUTPUTS, row_outputs

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


# A pytree node: torch.func transforms (vmap, functionalize) and torch.export take it apart into its
# tensors and put it back, so vmap(lambda s, t: smskd_loss(s, t, ...))(S, y) returns an SMSKDLossOutput
# of batched fields (without this, vmap refuses the output: "must only return Tensors").
torch.export.register_dataclass(SMSKDLossOutput, serialized_type_name="smskd_fast.SMSKDLossOutput")


def _rows(logits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(..., C) logits as (N, C) rows (2-D ones as they are)."""
    if logits is None or logits.dim() == 2:
        return logits
    return logits.reshape(-1, logits.shape[-1])


def _shaped(values: torch.Tensor, leading: tuple) -> torch.Tensor:
    """Per-row values (N,) in the leading shape of the logits (1-D ones as they are: a view costs a dispatch)."""
    return values if len(leading) == 1 else values.reshape(leading)


def _run(
    student_logits: torch.Tensor,
    target: Optional[torch.Tensor],
    teacher_logits: Optional[torch.Tensor],
    reference_logits: Optional[torch.Tensor],
    options: LossOptions,
    backend: str,
    reduction: str,
    teacher_topk: Optional[TopKTeacher] = None,
) -> RowOutputs:
    """The chosen backend's outputs, reduced as reduction says: by the backend itself when it can
    (one dispatch for the whole mean loss on the compiled and Triton ops), else here."""
    chosen = resolve_backend(backend, student_logits.device, student_logits.dtype, student_logits.shape[-1],
                             topk=teacher_topk is not None)
    in_backend = reduction != "none" and getattr(chosen, "reduces", False)
    flat_target = None if target is None else as_class_indices(target if target.dim() == 1 else target.reshape(-1))
    if flat_target is not None and not getattr(chosen, "checks_target", False):
        validation.check_target_values(flat_target, student_logits.shape[-1], options.ignore_index)
    student = _rows(student_logits)
    # Reduced here: the mean's scale (None for "sum"), folded into the gradient as the ops' own reduction does.
    scale = None if in_backend else reduction_grad_scale(reduction, None, flat_target, student, options.ignore_index,
                                                         "smskd_loss")
    inputs = RowInputs(
        student=student,
        target=flat_target,
        teacher=_rows(teacher_logits),
        reference=_rows(reference_logits),
        teacher_topk=None if teacher_topk is None else teacher_topk.rows(),
        grad_scale=scale,
        reduction=reduction if in_backend else "none",
    )
    rows = chosen.rows(inputs, options)
    if in_backend or reduction == "none":
        return rows
    # One reduction of the four terms: the loss keeps its history, row_outputs detaches the rest.
    return row_outputs(reduce_per_row_outputs([getattr(rows, name) for name in PER_ROW_OUTPUTS], scale))


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
    # The values are checked in _run, once the backend is known (most check them themselves).
    validation.check_target(target, student_logits, ignore_index, values=False)
    validation.check_options(
        temperature, reduction, weighting,
        {"ce_weight": ce_weight, "kd_weight": kd_weight, "ref_weight": ref_weight},
    )
    validation.check_teacher_topk(teacher_topk, teacher_logits, student_logits, temperature, target,
                                  ignore_index)
    validation.check_weighting_has_tcp(weighting, teacher_logits if teacher_topk is None else teacher_topk,
                                       reference_logits)
    options = LossOptions(float(temperature), float(ce_weight), float(kd_weight), float(ref_weight),
                          weighting, int(ignore_index), bool(overwrite_student_logits))
    backend = backend_for_derivatives(backend, "smskd_loss", student_logits, teacher_logits, reference_logits)
    rows = _run(student_logits, target, teacher_logits, reference_logits, options, backend, reduction, teacher_topk)
    leading = tuple(target.shape)
    terms = (rows.loss, rows.ce, rows.kd, rows.ref)
    loss, ce, kd, ref = (_shaped(term, leading) for term in terms) if reduction == "none" else terms
    return SMSKDLossOutput(loss=loss, ce=ce, kd=kd, ref=ref, tcp=_shaped(rows.tcp, leading),
                           weight=_shaped(rows.weight, leading))


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
    backend = backend_for_derivatives(backend, "kd_loss", student_logits, teacher_logits)
    rows = _run(student_logits, None, teacher_logits, None, options, backend, reduction)
    return _shaped(rows.loss, tuple(student_logits.shape[:-1])) if reduction == "none" else rows.loss


@torch.no_grad()
def true_class_probability(teacher_logits: torch.Tensor, target: torch.Tensor,
                           *, ignore_index: int = -100) -> torch.Tensor:
    """TCP_i = softmax(t_i)[y_i] at temperature 1, in float32 (float64 for float64 input); 0 on ignored rows."""
    validation.check_logits("teacher_logits", teacher_logits)
    validation.check_target(target, teacher_logits, ignore_index)
    target = as_class_indices(target)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long().unsqueeze(-1)
    acc = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    tcp = torch.softmax(teacher_logits.to(acc), dim=-1).gather(-1, safe_target).squeeze(-1)
    return torch.where(valid, tcp, torch.zeros_like(tcp))
