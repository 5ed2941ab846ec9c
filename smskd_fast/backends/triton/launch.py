"""Launch configurations of the Triton kernels and the function that launches them.

The configuration is a pure function of C and of how the rows are aligned
(logits_row_alignment), with no run-time autotuning: an autotuner re-runs a
kernel to time it, which would be wrong when the gradient overwrites the student
logits, and a table keeps launches deterministic and lets
benchmarks/triton_aot_report.py compile exactly the set that can run.
benchmarks/gpu/ sweeps the online configurations on a GPU to refine the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import triton
from torch.fx.experimental.symbolic_shapes import guard_or_false

from smskd_fast.backends.base import check_target_range
from smskd_fast.ops import schema
from smskd_fast.ops.launch_device import TRITON_COMPILE_OPTIONS, on_device_of
from smskd_fast.backends.triton import interpreter_index, interpreter_reductions, kernels

# Largest C handled by the one-tile kernel (each row whole in registers).
TILE_MAX_C = 4096
# Rows x columns of one tile (elements): fewer rows per program as C grows.
TILE_ELEMENTS = 2048
TILE_MAX_ROWS = 16
CHECK_BLOCK = 1024
# Tile widths where the default warps (about 8 elements per thread) made ptxas
# spill 4-8 bytes in some variant, and 4 warps spill in none, under triton 3.8 and
# 3.6 (256: smskd+grad bf16/fp16; 2048: kd+grad on sm_80). 64: with the grad_scale
# load, smskd+grad with fp64 scalars (Inductor's) on sm_80 spilled 4 bytes at 4 warps
# under triton 3.8; 2 warps (16 elements per thread, at most 155 registers) and 8 spill
# in no variant, and 2 amortize the per-row MUFU over more elements. 128 takes the
# default 8 since the maxima propagate NaN (stop 35): at 4 warps, smskd bf16/fp16 on
# sm_90 spilled 8 bytes under triton 3.6 (ptxas kept it to 64 registers), at 8 no
# variant spills under 3.6 or 3.8 (the spill of 8 warps that had chosen 4, ce+grad fp32
# on sm_80 under 3.6, is gone too). benchmarks/results/triton_aot_report*.md list every configuration.
TILE_WARPS_OVERRIDE = {64: 2, 256: 4, 2048: 4}


@dataclass(frozen=True)
class TileConfig:
    """_smskd_rows_tile_kernel: ROWS rows of BLOCK_C >= C columns per program."""

    rows: int
    block_c: int
    num_warps: int


@dataclass(frozen=True)
class OnlineConfig:
    """_smskd_rows_online_kernel: one row per program, BLOCK_C columns per step. maxima_columns: the
    columns that share a running maximum in the statistics sweep (the kernel's MAXIMA_COLUMNS); 0 (the
    default) lets the kernel choose (kernels.online_pack: one thread's 16-byte load where the rows allow
    16-byte loads, so that no step reduces over the block, else block_c); block_c one per step, a
    block-wide reduction each (the kernel before stop 27, kept in the sweep to be measured against)."""

    block_c: int
    num_warps: int
    maxima_columns: int = 0

    def __post_init__(self):
        if self.block_c < 1 or self.block_c & (self.block_c - 1):
            raise ValueError(f"block_c must be a power of two, got {self.block_c}")
        if self.maxima_columns and (self.maxima_columns & (self.maxima_columns - 1) or self.maxima_columns > self.block_c):
            raise ValueError(f"maxima_columns must be 0 or a power of two <= block_c = {self.block_c}, "
                             f"got {self.maxima_columns}")

    def pack(self, element_size: int, row_align: int = 16) -> int:
        """The columns per running maximum the kernel takes (kernels.online_pack) for logits of
        element_size bytes in rows aligned to row_align elements (logits_row_alignment)."""
        return kernels.online_pack(self.block_c, self.maxima_columns, row_align, 8 * element_size)


ONLINE_CONFIGS: Tuple[OnlineConfig, ...] = (
    OnlineConfig(1024, 4),
    OnlineConfig(2048, 8),
    OnlineConfig(2048, 8, maxima_columns=2048),
    OnlineConfig(4096, 8),
    OnlineConfig(4096, 16),
)
# Not listed because they spill (benchmarks/results/triton_aot_report.md): 8192 columns with
# 16 warps (the 128-register cap of 512 threads), 2048 with 4 warps (forward only, sm_80).
DEFAULT_ONLINE_CONFIG = OnlineConfig(2048, 8)


def power_of_two_at_least(size, smallest: int) -> int:
    """The smallest power of two >= size and >= smallest, as a Python int.

    size may be a SymInt (the ops are traced with symbolic shapes under
    torch.compile(dynamic=True) and opcheck): comparisons guard on the power-of-two
    bucket of C, so the choice is an int (hashable, a valid constexpr) and C stays
    symbolic, where triton.next_power_of_2 would give a SymInt expression.
    """
    block = smallest
    while block < size:
        block *= 2
    return block


def tile_config(num_classes: int) -> TileConfig:
    """The tile shape for C <= TILE_MAX_C: about 8 elements per thread and input (C may be a SymInt)."""
    block_c = power_of_two_at_least(num_classes, 16)
    rows = max(1, min(TILE_MAX_ROWS, TILE_ELEMENTS // block_c))
    num_warps = TILE_WARPS_OVERRIDE.get(block_c, max(1, min(16, rows * block_c // 256)))
    return TileConfig(rows, block_c, num_warps)


def all_tile_configs() -> Tuple[TileConfig, ...]:
    """Every tile configuration that tile_config can return."""
    sizes = []
    block_c = 16
    while block_c <= TILE_MAX_C:
        sizes.append(tile_config(block_c))
        block_c *= 2
    return tuple(sizes)


def online_config(num_classes: int) -> OnlineConfig:
    """The column block for C > TILE_MAX_C."""
    return DEFAULT_ONLINE_CONFIG


def row_alignment(*values: int) -> int:
    """The largest power of two <= 16 that divides every value (C and the row strides)."""
    align = 16
    while align > 1 and any(value % align for value in values):
        align //= 2
    return align


def logits_row_alignment(num_classes: int, logits: Sequence[Optional[torch.Tensor]]) -> int:
    """The kernels' ROW_ALIGN: the largest power of two <= 16 elements dividing C and, for each logits
    tensor given (None: absent), its row stride and storage offset, so that every row starts as aligned
    as the storage (the allocators' are aligned to >= 16 bytes). The offset makes a view that starts off
    a 16-byte boundary (a flat buffer's view from element 1) take the narrow loads' configuration
    (kernels.sixteen_byte_loads), which only changes speed and the order of the row's sums.

    From sizes, strides and offsets alone, as tracing allows (data_ptr() does not). An offset whose
    alignment is unknown while tracing (data-dependent, e.g. a slice at a tensor's .item()) counts as
    unaligned (guard_or_false), not as an error. torch.compile does not guard a graph on its inputs'
    offsets, so a compiled graph keeps the configuration of the call it was traced with."""
    present = [tensor for tensor in logits if tensor is not None]
    align = row_alignment(num_classes, *(tensor.stride(0) for tensor in present))
    for tensor in present:
        offset = tensor.storage_offset()
        if isinstance(offset, int):  # eager: no symbolic reasoning to pay for
            while offset % align:
                align //= 2
        else:
            while align > 1 and not guard_or_false(offset % align == 0):
                align //= 2
    return align


def kernels_interpreted() -> bool:
    """Whether the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels._smskd_rows_online_kernel, InterpretedFunction)


if kernels_interpreted():
    interpreter_reductions.install()
    interpreter_index.install()


def check_targets_on_host(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """The interpreter ignores tl.device_assert (it has no debug mode), so check here instead."""
    check_target_range(target, num_classes, ignore_index)


def allocate_outputs(student: torch.Tensor, compute_grad: bool, grad_out: Optional[torch.Tensor]):
    """The fp32 per-row outputs (schema.PER_ROW_OUTPUTS) and the gradient buffer ((0, C) without compute_grad)."""
    num_rows, num_classes = student.shape
    per_row = [torch.empty((num_rows,), dtype=torch.float32, device=student.device) for _ in schema.PER_ROW_OUTPUTS]
    if grad_out is not None:
        grad = grad_out
    elif compute_grad:
        grad = torch.empty((num_rows, num_classes), dtype=student.dtype, device=student.device)
    else:
        grad = student.new_empty((0, num_classes))
    return per_row, grad


def check_targets(target: Optional[torch.Tensor], num_classes: int, ignore_index: int, wrap) -> None:
    """Refuses a target outside [0, C) other than ignore_index: on the device, or on the host when interpreted."""
    if target is None:
        return
    if kernels_interpreted():
        check_targets_on_host(target, num_classes, ignore_index)
    else:
        wrap(kernels._check_targets_kernel)[(triton.cdiv(target.shape[0], CHECK_BLOCK),)](
            target, target.shape[0], num_classes, ignore_index, BLOCK=CHECK_BLOCK, **TRITON_COMPILE_OPTIONS,
        )


def launch_rows(
    student: torch.Tensor,
    target: Optional[torch.Tensor],
    teacher: Optional[torch.Tensor],
    reference: Optional[torch.Tensor],
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    ref_weight: float,
    weighting: str,
    ignore_index: int,
    compute_grad: bool,
    grad_scale: Optional[torch.Tensor] = None,
    grad_out: Optional[torch.Tensor] = None,
    config: Optional[OnlineConfig] = None,
    wrap=lambda kernel: kernel,
):
    """Runs the fused kernel on (N, C) rows; returns (loss, ce, kd, ref, tcp, weight, grad).

    Logits are fp32, bf16 or fp16 with unit column stride; per-row outputs are fp32.
    grad_scale, a one-element fp32 tensor on the logits' device or None, multiplies
    the gradient written (read by the kernel: no host synchronisation).
    grad_out, when given, receives the gradient (it may be the student itself: each
    program reads a block before it writes it). config forces an online
    configuration (benchmark sweeps). wrap is torch.library.wrap_triton inside
    the custom op, so that torch.compile sees the kernels.
    """
    num_rows, num_classes = student.shape
    per_row, grad = allocate_outputs(student, compute_grad, grad_out)
    if num_rows == 0:
        return (*per_row, grad)
    with on_device_of(student):
        check_targets(target, num_classes, ignore_index, wrap)
        dummy = student  # stands for absent tensors; the kernels never read it then
        common = (
            student,
            dummy if teacher is None else teacher,
            dummy if reference is None else reference,
            dummy if target is None else target,
            grad if compute_grad else dummy,
            dummy if grad_scale is None else grad_scale,
            *per_row,
        )
        strides = (
            student.stride(0),
            0 if teacher is None else teacher.stride(0),
            0 if reference is None else reference.stride(0),
            grad.stride(0) if compute_grad else 0,
        )
        scalars = (float(temperature), float(ce_weight), float(kd_weight), float(ref_weight), int(ignore_index))
        row_align = logits_row_alignment(num_classes, (student, teacher, reference, grad if compute_grad else None))
        flags = dict(
            ROW_ALIGN=row_align,
            HAS_TARGET=target is not None,
            HAS_TEACHER=teacher is not None,
            HAS_REFERENCE=reference is not None,
            WEIGHTING=schema.WEIGHTING_CODES[weighting],
            COMPUTE_GRAD=bool(compute_grad),
            HAS_GRAD_SCALE=grad_scale is not None,
            T_POWER=kernels.temperature_power(temperature, target is not None,
                                              teacher is not None or reference is not None),
        )
        if config is None and num_classes <= TILE_MAX_C:
            tile = tile_config(num_classes)
            wrap(kernels._smskd_rows_tile_kernel)[(triton.cdiv(num_rows, tile.rows),)](
                *common, num_rows, num_classes, *strides, *scalars, **flags,
                ROWS=tile.rows, BLOCK_C=tile.block_c, num_warps=tile.num_warps, **TRITON_COMPILE_OPTIONS,
            )
        else:
            online = config or online_config(num_classes)
            wrap(kernels._smskd_rows_online_kernel)[(num_rows,)](
                *common, num_classes, *strides, *scalars, **flags,
                BLOCK_C=online.block_c, MAXIMA_COLUMNS=online.maxima_columns, num_warps=online.num_warps,
                **TRITON_COMPILE_OPTIONS,
            )
    return (*per_row, grad)
