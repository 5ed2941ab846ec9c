"""Argument checks for the public loss API: one clear error per bad input.

Each message names the argument and what was expected, so that a user sees what
to fix without reading a kernel's stack trace.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from smskd_fast.backends.base import check_target_range
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.ops.batching import vmap_batched
from smskd_fast.ops.reduction import as_class_indices
from smskd_fast.ops.schema import WEIGHTINGS

REDUCTIONS = ("mean", "sum", "none")
FLOATING_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_logits(name: str, logits: torch.Tensor) -> None:
    """Logits must be a floating tensor with at least one dimension (the classes)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOATING_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float64, float32, bfloat16 or float16), got {logits.dtype}"
        )
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., C) with C >= 1, got {tuple(logits.shape)}")


def check_companion_logits(name: str, logits: Optional[torch.Tensor], student: torch.Tensor) -> None:
    """Teacher or reference logits must match the student's shape, dtype and device; a warning when they
    require grad (they are constants to every backend)."""
    if logits is None:
        return
    check_logits(name, logits)
    if logits.shape != student.shape:
        raise ValueError(
            f"{name} must have the student_logits' shape {tuple(student.shape)}, got {tuple(logits.shape)}"
        )
    if logits.dtype != student.dtype:
        raise TypeError(
            f"{name} must have the student_logits' dtype {student.dtype}, got {logits.dtype}; "
            "cast all logits to one dtype"
        )
    if logits.device != student.device:
        raise ValueError(
            f"{name} must be on the student_logits' device {student.device}, got {logits.device}"
        )
    warn_if_frozen_requires_grad(name, logits, "student_logits", stacklevel=3)


def warn_if_frozen_requires_grad(name: str, tensor: Optional[torch.Tensor], trained: str, stacklevel: int) -> None:
    """Warns (once per place, as Python does) when a frozen model's input requires grad: a teacher trained
    jointly would otherwise silently get no gradient from the loss, and a teacher's forward run with grad
    builds a graph for nothing. stacklevel counts from the caller of this function."""
    if tensor is not None and tensor.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        warnings.warn(f"{name} requires grad, but the loss is differentiable with respect to {trained} only: no "
                      f"gradient reaches {name}; compute it under torch.no_grad() or pass {name}.detach() to "
                      f"silence this warning", UserWarning, stacklevel=stacklevel + 1)


def check_target(target: torch.Tensor, student: torch.Tensor, ignore_index: int, *, values: bool = True) -> None:
    """Target: integer class indices with the logits' leading shape, in [0, C) or ignore_index.

    values=False leaves the values to the caller (smskd_loss checks them only for backends
    that do not, Backend.checks_target: on the CPU a second check cost ~10 us per call).
    """
    check_class_indices(target, tuple(student.shape[:-1]), student.shape[-1], student.device,
                        ignore_index, owner="student_logits", values=values)


def check_class_indices(target: torch.Tensor, leading: tuple, num_classes: int, device: torch.device,
                        ignore_index: int, *, owner: str, values: bool = True) -> None:
    """Target of shape leading with values in [0, num_classes) or ignore_index (an integer), on device."""
    check_ignore_index(ignore_index)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
    if tuple(target.shape) != leading:
        raise ValueError(f"target must have the leading shape {leading} of {owner}, got {tuple(target.shape)}")
    if target.device != device:
        possessive = f"{owner}'" if owner.endswith("s") else f"{owner}'s"
        raise ValueError(f"target must be on the {possessive} device {device}, got {target.device}")
    if values:
        check_target_values(target, num_classes, ignore_index)


def values_are_readable(*tensors: torch.Tensor) -> bool:
    """Whether a data-dependent check may read these tensors' values now: not while torch.compile or
    make_fx traces (torch.func.linearize: proxies hold no values), nor when one of them is batched or
    wrapped by a torch.func transform (vmap's batched values cannot be read; a tensor the transformed
    function only captures still can, and is checked)."""
    if torch.compiler.is_compiling() or get_proxy_mode() is not None:
        return False
    return not any(vmap_batched(tensor) for tensor in tensors)


def check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every value in [0, num_classes) or ignore_index. A data-dependent check needs the values on the
    host: done eagerly on the CPU; CUDA kernels check on the device instead, and compiled or traced
    graphs rely on the kernels' own checks (values_are_readable): the reference's gather refuses a
    class outside [0, C) there, the fused ops check each sample."""
    if target.device.type == "cpu" and target.numel() > 0 and values_are_readable(target):
        check_target_range(target, num_classes, ignore_index)


# The temperatures whose square and inverse the kernels can hold in float32 (2**126 < float32's max).
TEMPERATURE_RANGE = (2.0 ** -63, 2.0 ** 63)
_INT64_RANGE = (-2 ** 63, 2 ** 63 - 1)


def _is_real(value) -> bool:
    """A real number, Python's or numpy's (numbers.Real), not a bool and not a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_ignore_index(ignore_index) -> None:
    """An integer (Python's or numpy's) in int64's range, as the kernels compare it with int64 targets."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral) \
            or not _INT64_RANGE[0] <= int(ignore_index) <= _INT64_RANGE[1]:
        raise TypeError(f"ignore_index must be an integer in int64's range (the target value of rows to skip), "
                        f"got {ignore_index!r}")


def check_options(temperature: float, reduction: str, weighting: str, weights: dict) -> None:
    """Scalar options: T > 0 within TEMPERATURE_RANGE, known reduction and weighting, finite loss weights
    (Python or numpy numbers)."""
    if not _is_real(temperature) or not temperature > 0 or temperature != temperature:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if temperature == float("inf"):
        raise ValueError("temperature must be finite, got inf")
    if not TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]:
        raise ValueError(f"temperature must be in [2**-63, 2**63] (the kernels hold T**2 and 1/T in float32), "
                         f"got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    for name, value in weights.items():
        if not _is_real(value) or value != value or abs(value) == float("inf"):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_teacher_topk(teacher_topk, teacher_logits: Optional[torch.Tensor], student: torch.Tensor,
                       temperature: Optional[float] = None, target: Optional[torch.Tensor] = None,
                       ignore_index: int = -100) -> None:
    """A top-k teacher replaces teacher_logits and must fit the student's rows and classes.

    Its indices must be distinct within a row (a repeated class would count its
    probability twice) and in [0, C): checked on the host for CPU tensors, by a
    device-side assertion (no host sync) elsewhere; compiled and traced graphs, and
    fields batched by a torch.func transform, skip both, like the target's range
    check. Given the loss temperature, a teacher that records the temperature it was
    built for (TopKTeacher.temperature) must have that one, on every device, and CPU
    rows are also checked to be a distribution's top k (see check_topk_kept_mass). Rows whose target is
    ignore_index are not read by any backend, so their contents (a cache's
    zero-filled padding) are not checked.
    """
    if teacher_topk is None:
        return
    if not isinstance(teacher_topk, TopKTeacher):
        raise TypeError(f"teacher_topk must be a smskd_fast.TopKTeacher (TopKTeacher.from_logits builds one), "
                        f"got {type(teacher_topk).__name__}")
    if teacher_logits is not None:
        raise ValueError("give the teacher either as teacher_logits or as teacher_topk, not both")
    built_at = teacher_topk.temperature
    if temperature is not None and built_at is not None and not math.isclose(built_at, temperature, rel_tol=1e-6):
        raise ValueError(f"teacher_topk was built for temperature {built_at!r} (its log_sum_exp_at_temperature is "
                         f"taken there), the loss's temperature is {temperature!r}: build it with "
                         f"TopKTeacher.from_logits(..., temperature={temperature!r})")
    leading, num_classes = tuple(student.shape[:-1]), student.shape[-1]
    k = teacher_topk.values.shape[-1] if teacher_topk.values.dim() else 0
    for name, tensor, shape in (("values", teacher_topk.values, leading + (k,)),
                                ("indices", teacher_topk.indices, leading + (k,)),
                                ("true_logit", teacher_topk.true_logit, leading),
                                ("log_sum_exp", teacher_topk.log_sum_exp, leading),
                                ("log_sum_exp_at_temperature", teacher_topk.log_sum_exp_at_temperature, leading)):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"teacher_topk.{name} must have shape {shape} for student_logits "
                             f"{tuple(student.shape)}, got {tuple(tensor.shape)}")
        if tensor.device != student.device:
            raise ValueError(f"teacher_topk.{name} must be on the student_logits' device {student.device}, "
                             f"got {tensor.device}")
        if name != "indices" and not tensor.dtype.is_floating_point:
            raise TypeError(f"teacher_topk.{name} must be a floating tensor, got {tensor.dtype}")
    if not 1 <= k <= num_classes:
        raise ValueError(f"teacher_topk must keep between 1 and C={num_classes} classes per row, got {k}")
    indices = teacher_topk.indices
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"teacher_topk.indices must be an integer tensor, got {indices.dtype}")
    read = [indices, teacher_topk.values, teacher_topk.log_sum_exp_at_temperature]
    if indices.numel() == 0 or not values_are_readable(*read, *([] if target is None else [target])):
        return
    checked = None if target is None else as_class_indices(target) != ignore_index
    if indices.device.type == "cpu":
        check_topk_indices(indices, num_classes, checked)
        if temperature is not None:
            check_topk_kept_mass(teacher_topk, temperature, checked)
    else:
        assert_topk_indices_async(indices, num_classes, checked)


def _row_name(bad_rows: torch.Tensor) -> str:
    """'row 3', or 'row (1, 2)' for more than one leading dimension, of the first True in bad_rows
    ('the row' for logits of shape (C,))."""
    if bad_rows.dim() == 0:
        return "the row"
    first = torch.nonzero(bad_rows)[0].tolist()
    return f"row {first[0]}" if len(first) == 1 else f"row {tuple(first)}"


def _repeats(indices: torch.Tensor) -> torch.Tensor:
    """Per row (..., k): whether some class occurs twice."""
    ordered = indices.sort(dim=-1).values
    return (ordered[..., 1:] == ordered[..., :-1]).any(dim=-1)


def _bad_indices(indices: torch.Tensor, num_classes: int, checked: Optional[torch.Tensor]):
    """Per row (...): (an index outside [0, num_classes), a repeated index), False where checked is False."""
    outside = ((indices < 0) | (indices >= num_classes)).any(dim=-1)
    repeated = _repeats(indices)
    if checked is None:
        return outside, repeated
    return outside & checked, repeated & checked


def check_topk_indices(indices: torch.Tensor, num_classes: int, checked: Optional[torch.Tensor] = None) -> None:
    """Top-k indices (..., k) in [0, num_classes) and distinct within each row (reads them on the host);
    checked (...), when given, names the rows to check."""
    outside, repeated = _bad_indices(indices, num_classes, checked)
    if bool(outside.any()):
        row = indices[outside][0]  # the first bad row, in row-major order
        found = row[(row < 0) | (row >= num_classes)][0]
        raise ValueError(f"teacher_topk.indices must be in [0, {num_classes}), found {int(found)} "
                         f"in {_row_name(outside)}")
    if bool(repeated.any()):
        raise ValueError(f"teacher_topk.indices must be distinct within a row (a repeated class counts its "
                         f"probability twice), {_row_name(repeated)} repeats a class")


def assert_topk_indices_async(indices: torch.Tensor, num_classes: int, checked: Optional[torch.Tensor] = None
                              ) -> None:
    """The same checks as check_topk_indices as device-side assertions: no host sync, the
    error surfaces at a later synchronisation (on CUDA, as a device-side assert)."""
    outside, repeated = _bad_indices(indices, num_classes, checked)
    torch._assert_async(~outside.any(), f"teacher_topk.indices must be in [0, {num_classes})")
    torch._assert_async(~repeated.any(), "teacher_topk.indices must be distinct within a row")


# Allowed excess of log(sum of the kept probabilities) over 0, per unit of |value|/T: two
# half-ulps of the stored dtype (float16's 2^-11 at least; bfloat16's 2^-8), so that rounding of
# stored values never trips the check.
KEPT_MASS_LOG_SLACK_PER_LOGIT = 2.0 ** -10
KEPT_MASS_LOG_SLACK = 1e-4


def _kept_mass_slack_per_logit(*stored: torch.Tensor) -> float:
    """KEPT_MASS_LOG_SLACK_PER_LOGIT, or one epsilon of a coarser stored dtype (bfloat16's 2^-7)."""
    return max([KEPT_MASS_LOG_SLACK_PER_LOGIT] + [torch.finfo(tensor.dtype).eps for tensor in stored
                                                   if tensor.dtype.is_floating_point])


def check_topk_kept_mass(teacher_topk, temperature: float, checked: Optional[torch.Tensor] = None) -> None:
    """The kept probabilities exp(v/T - log_sum_exp_at_temperature) sum to at most 1 (in the rows
    checked names, when given).

    More than 1 (beyond what rounding of stored values explains) means the
    log-sum-exp does not belong to these values at this temperature, most often
    a cache built for another temperature; the loss would silently clamp the
    rest's mass to 0. Costs O(N k) on the host.
    """
    values = teacher_topk.values.double() / temperature
    log_kept_mass = torch.logsumexp(values, dim=-1) - teacher_topk.log_sum_exp_at_temperature.double()
    per_logit = _kept_mass_slack_per_logit(teacher_topk.values, teacher_topk.log_sum_exp_at_temperature)
    slack = KEPT_MASS_LOG_SLACK + per_logit * values.abs().amax(dim=-1)
    too_much = log_kept_mass > slack
    if checked is not None:
        too_much &= checked
    if bool(too_much.any()):
        mass = float(log_kept_mass[too_much][0].exp())
        raise ValueError(f"teacher_topk's kept probabilities exp(values/T - log_sum_exp_at_temperature) sum to "
                         f"{mass:.6g} > 1 in {_row_name(too_much)} at temperature {temperature}: "
                         "log_sum_exp_at_temperature must be the log-sum-exp of the full teacher row at the "
                         "loss temperature (was the cache built for another temperature?)")


def check_weighting_has_tcp(weighting: str, teacher, reference: Optional[torch.Tensor]) -> None:
    """A TCP-based weighting of the reference term needs the teacher's logits."""
    if reference is not None and teacher is None and weighting != "constant":
        raise ValueError(
            f"weighting={weighting!r} computes each row's weight from the teacher's true-class "
            "probability, so it needs teacher_logits; pass teacher_logits or use weighting='constant'"
        )
