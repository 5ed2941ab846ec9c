"""Backward's one N x C step: scaling the saved gradient rows in place, row i by factor[i].

The kernels write the gradient already multiplied by the reduction's factor
(the op's grad_scale), so for a mean loss differentiated with grad_output = 1
every factor here is exactly 1 and the step should cost no memory traffic.
Knowing that on the host would take a device synchronisation; instead, on CUDA
a Triton kernel reads each row's factor on the device and reads and writes the
row only when it is not 1 (a launch of programs that return at once, about the
cost of a launch). On the CPU the check is an ordinary reduction over N values.
Without Triton on CUDA, and for rows whose columns are not contiguous, it is a
plain in-place multiply.
"""
from __future__ import annotations

import torch

from smskd_fast.ops.launch_device import TRITON_COMPILE_OPTIONS, on_device_of

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional; CUDA then scales every row with mul_
    triton = None

__all__ = ["scale_rows_"]

_BLOCK_COLUMNS = 4096  # columns per program: a 32000-column bf16 row is 8 programs of 8 KB
_UNIFORM_PROGRAMS = 1024  # row programs for a 0-d factor: a few per SM, each striding over the rows


def scale_rows_(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """grad (N, C) *= factor (N,)[:, None] in place; returns grad. On CUDA rows whose factor is exactly 1 are
    left unread; on the CPU the gradient is left untouched when every factor is 1.

    A 0-d factor (the gradient of a reduced loss: grad_output) scales every row alike.
    The product is formed in factor's dtype (fp32, or fp64 for fp64 logits) and
    rounded once to grad's dtype, as grad.mul_(factor[:, None]) rounds it.
    """
    if grad.dim() != 2 or factor.shape not in ((), grad.shape[:1]):
        raise ValueError(f"scale_rows_: grad must be (N, C) and factor (N,) or 0-d, got {tuple(grad.shape)} and "
                         f"{tuple(factor.shape)}")
    if grad.numel() == 0:
        return grad
    # (N, 1) or (1, 1): never a 0-d operand, which ATen would round to grad's dtype before multiplying.
    column = factor.unsqueeze(-1) if factor.dim() == 1 else factor.reshape(1, 1)
    if grad.device.type == "cpu":
        if not (factor.item() == 1 if factor.dim() == 0 else bool((factor == 1).all())):
            grad.mul_(column)
        return grad
    if triton is None or grad.device.type != "cuda" or grad.stride(-1) != 1:
        return grad.mul_(column)
    launch_scale_rows(grad, factor.contiguous())
    return grad


def launch_scale_rows(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """Runs _scale_rows_kernel over (rows, column blocks) for a factor per row, _scale_all_rows_kernel over
    at most _UNIFORM_PROGRAMS row programs for a 0-d one (a reduced loss's grad_output: a 65536-row batch
    would otherwise launch 65536 programs that only read it); under TRITON_INTERPRET=1 they take CPU
    tensors (tests)."""
    rows, cols = grad.shape
    column_blocks = triton.cdiv(cols, _BLOCK_COLUMNS)
    with on_device_of(grad):
        if factor.dim() == 0:
            grid = (min(rows, _UNIFORM_PROGRAMS), column_blocks)
            _scale_all_rows_kernel[grid](grad, factor, grad.stride(0), rows, cols, BLOCK=_BLOCK_COLUMNS,
                                         **TRITON_COMPILE_OPTIONS)
        else:
            _scale_rows_kernel[(rows, column_blocks)](grad, factor, grad.stride(0), cols, BLOCK=_BLOCK_COLUMNS,
                                                      **TRITON_COMPILE_OPTIONS)


if triton is not None:

    @triton.jit
    def _scale_rows_kernel(grad_ptr, factor_ptr, row_stride, cols, BLOCK: tl.constexpr):
        """One program per (row, block of columns): multiplies the block by the row's factor unless it is 1."""
        row = tl.program_id(0)
        factor = tl.load(factor_ptr + row)
        if factor != 1.0:
            columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            inside = columns < cols
            pointers = grad_ptr + row.to(tl.int64) * row_stride + columns
            values = tl.load(pointers, mask=inside)
            tl.store(pointers, (values.to(factor.dtype) * factor).to(values.dtype), mask=inside)

    @triton.jit
    def _scale_all_rows_kernel(grad_ptr, factor_ptr, row_stride, rows, cols, BLOCK: tl.constexpr):
        """Programs (row programs, column blocks) that stride over the rows with one factor for all, read once:
        nothing is read or written when it is 1."""
        factor = tl.load(factor_ptr)
        if factor != 1.0:
            columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            inside = columns < cols
            for row in range(tl.program_id(0), rows, tl.num_programs(0)):
                pointers = grad_ptr + tl.cast(row, tl.int64) * row_stride + columns
                values = tl.load(pointers, mask=inside)
                tl.store(pointers, (values.to(factor.dtype) * factor).to(values.dtype), mask=inside)
