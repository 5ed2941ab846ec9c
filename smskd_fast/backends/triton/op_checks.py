"""The Triton ops' argument checks: what the compiled ops refuse (csrc/cpu/loss_rows.cpp,
csrc/cuda/loss_rows_cuda.cpp, csrc/topk_op_checks.h), refused here with the same words and the Triton
op's name, before a kernel could read past a shorter teacher or a target of the wrong length.

The public API validates before it gets here (loss/validation.py); these checks are for direct callers of
torch.ops.smskd_fast.smskd_loss_rows(_topk)_triton and for vmap's rule (ops/vmap_rules.py), which sends
a call these refuse sample by sample so that the message is the sample's own.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from smskd_fast.ops import schema

__all__ = ["check_dense_arguments", "check_topk_arguments"]


def _sizes(shape) -> str:
    """A shape as the compiled ops print it: [5, 11]."""
    return str(list(shape))


def _is_integral(tensor: torch.Tensor) -> bool:
    """An integer dtype, bool excluded (at::isIntegralType(dtype, includeBool=false))."""
    return not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)


def _check_student_and_temperature(op: str, student: torch.Tensor, temperature: float) -> None:
    if student.dim() != 2 or student.shape[1] < 1:
        raise ValueError(f"{op}: student must have shape (N, C) with C >= 1, got {_sizes(student.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature:g}")


def _check_same_device(op: str, name: str, tensor: torch.Tensor, student: torch.Tensor) -> None:
    if tensor.device != student.device:  # TORCH_CHECK in the compiled ops: a RuntimeError
        raise RuntimeError(f"{op}: {name} must be on the student's device {student.device}, got {tensor.device}")


def _check_weighting(op: str, weighting: str) -> None:
    if weighting not in schema.WEIGHTING_CODES:
        known = ", ".join(f"'{name}'" for name in schema.WEIGHTINGS)
        raise ValueError(f"{op}: weighting must be one of {known}, got '{weighting}'")


def _check_companion(op: str, name: str, logits: Optional[torch.Tensor], student: torch.Tensor) -> None:
    """teacher or reference logits: the student's shape, dtype and device."""
    if logits is None:
        return
    if logits.shape != student.shape:
        raise ValueError(f"{op}: {name} must have the student's shape {_sizes(student.shape)}, "
                         f"got {_sizes(logits.shape)}")
    if logits.dtype != student.dtype:
        raise TypeError(f"{op}: {name} must have the student's dtype {student.dtype}, got {logits.dtype}")
    _check_same_device(op, name, logits, student)


def _check_target(op: str, target: Optional[torch.Tensor], student: torch.Tensor) -> None:
    """Integer class indices, one per row, on the student's device (their range: launch.check_targets)."""
    if target is None:
        return
    if not _is_integral(target):
        raise TypeError(f"{op}: target must hold integer class indices, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != student.shape[0]:
        raise ValueError(f"{op}: target must have shape ({student.shape[0]},), got {_sizes(target.shape)}")
    _check_same_device(op, "target", target, student)


def check_dense_arguments(op: str, student: torch.Tensor, target: Optional[torch.Tensor],
                          teacher: Optional[torch.Tensor], reference: Optional[torch.Tensor],
                          temperature: float, weighting: str) -> None:
    """smskd_loss_rows_triton's tensors, temperature and weighting, as smskd_loss_rows checks them."""
    _check_student_and_temperature(op, student, temperature)
    _check_companion(op, "teacher", teacher, student)
    _check_companion(op, "reference", reference, student)
    _check_weighting(op, weighting)
    _check_target(op, target, student)


def _check_rows(op: str, name: str, tensor: torch.Tensor, shape: Tuple[int, ...], student: torch.Tensor) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {_sizes(shape)}, got {_sizes(tensor.shape)}")
    _check_same_device(op, name, tensor, student)


def check_topk_arguments(op: str, student: torch.Tensor, target: Optional[torch.Tensor],
                         topk_values: torch.Tensor, topk_indices: torch.Tensor, true_logit: torch.Tensor,
                         log_sum_exp: torch.Tensor, log_sum_exp_at_temperature: torch.Tensor,
                         reference: Optional[torch.Tensor], temperature: float, weighting: str) -> None:
    """smskd_loss_rows_topk_triton's tensors, temperature and weighting, as smskd_loss_rows_topk checks them.
    Not the indices' range and distinctness, which the compiled CPU op checks on the host: the kernels clamp
    the indices (no read out of bounds, as in the CUDA op), and the public API checks them first
    (loss/validation.check_teacher_topk)."""
    _check_student_and_temperature(op, student, temperature)
    rows, classes = student.shape
    if not (topk_values.dim() == 2 and topk_values.shape[0] == rows and 1 <= topk_values.shape[1] <= classes):
        raise ValueError(f"{op}: topk_values must have shape ({rows}, k) with 1 <= k <= {classes}, "
                         f"got {_sizes(topk_values.shape)}")
    k = topk_values.shape[1]
    _check_rows(op, "topk_values", topk_values, (rows, k), student)
    _check_rows(op, "topk_indices", topk_indices, (rows, k), student)
    for name, values in (("true_logit", true_logit), ("log_sum_exp", log_sum_exp),
                         ("log_sum_exp_at_temperature", log_sum_exp_at_temperature)):
        _check_rows(op, name, values, (rows,), student)
    for name, values in (("topk_values", topk_values), ("true_logit", true_logit), ("log_sum_exp", log_sum_exp),
                         ("log_sum_exp_at_temperature", log_sum_exp_at_temperature)):
        if not values.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {values.dtype}")
    if not _is_integral(topk_indices):
        raise TypeError(f"{op}: topk_indices must hold integer class indices, got {topk_indices.dtype}")
    if reference is not None:
        _check_rows(op, "reference", reference, tuple(student.shape), student)
        if reference.dtype != student.dtype:
            raise TypeError(f"{op}: reference must have the student's dtype {student.dtype}, got {reference.dtype}")
    _check_weighting(op, weighting)
    _check_target(op, target, student)
