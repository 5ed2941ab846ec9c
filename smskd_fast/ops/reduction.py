"""The reductions "sum" and "mean" of the fused loss, for every layer that applies one.

The compiled ops reduce inside their one dispatch (csrc/reduction_arg.h, the op's
reduction argument); the Triton ops, the public API for backends that cannot
(the reference) and the chunked fused-linear loss use these Python twins, which
compute the same values with the same operations.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from smskd_fast.ops import schema

__all__ = ["as_class_indices", "mean_reduction_scale", "reduction_grad_scale", "reduce_per_row_outputs"]


def as_class_indices(target: torch.Tensor) -> torch.Tensor:
    """target as int64, as the kernels read it: compared with ignore_index in a narrower dtype, -100
    would wrap (to 156 in uint8) and a row of class 156 would count as ignored."""
    return target if target.dtype == torch.int64 else target.long()


def mean_reduction_scale(valid_rows: Union[torch.Tensor, int], student: torch.Tensor) -> torch.Tensor:
    """1 / max(number of valid rows, 1) in the accumulation dtype on the student's device: 0-d for one
    call's (N,) mask or row count, (B,) for a (B, N) mask of B samples (ops/vmap_rules.py).

    valid_rows is the rows' boolean mask (counted on the device: no synchronisation) or their number.
    "mean" multiplies the sum by it, and the kernels fold the same tensor into the gradient they
    write (the op's grad_scale), so that backward has no N x C pass left when grad_output is 1.
    """
    acc = schema.accumulation_dtype(student.dtype)
    if isinstance(valid_rows, int):
        return torch.full((), 1.0 / max(valid_rows, 1), dtype=acc, device=student.device)
    # Counted in acc directly (one operation fewer per call) while every partial sum is an exact
    # integer: up to 2 / eps = 2^24 rows in float32.
    exact = (valid_rows.shape[-1] if valid_rows.dim() else 1) <= 2 / torch.finfo(acc).eps
    count = valid_rows.sum(dim=-1, dtype=acc) if exact else valid_rows.sum(dim=-1).to(acc)
    return count.clamp(min=1).reciprocal_()  # clamp_ has no vmap batching rule


def reduction_grad_scale(reduction: str, grad_scale: Optional[torch.Tensor], target: Optional[torch.Tensor],
                         student: torch.Tensor, ignore_index: int, op: str) -> Optional[torch.Tensor]:
    """The factor a reducing op writes its gradient with: grad_scale for "none", None (1) for "sum",
    the mean's scale for "mean" (grad_scale must then be None); the compiled ops' rule and messages."""
    if reduction not in schema.REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(map(repr, schema.REDUCTIONS))}, "
                         f"got {reduction!r}")
    if reduction == "none":
        return grad_scale
    if grad_scale is not None:
        raise ValueError(f"{op}: grad_scale must be None when reduction is 'sum' or 'mean' (the operator then "
                         "scales the gradient itself)")
    if reduction == "sum":
        return None
    if target is None:
        return mean_reduction_scale(student.shape[0], student)
    return mean_reduction_scale(as_class_indices(target) != ignore_index, student)


def reduce_per_row_outputs(outputs: Sequence[torch.Tensor], scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """outputs (the per-row ones first) with loss, ce, kd and ref summed over the rows (their last dimension:
    each sample's, for B samples' (B, N) outputs), times scale when given (0-d, or (B,): one per sample)."""
    count = len(schema.REDUCED_OUTPUTS)
    totals = list(torch.stack(tuple(outputs[:count])).sum(dim=-1).unbind())
    factor = 1.0 if scale is None else scale
    # vmap has no batching rule for _foreach_mul, which takes one scalar (tensor) for the list
    if torch._C._are_functorch_transforms_active() or (scale is not None and scale.dim() > 0):
        reduced = [total * factor for total in totals]
    else:
        reduced = torch._foreach_mul(totals, factor)
    return (*reduced, *outputs[count:])
