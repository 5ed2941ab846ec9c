"""Launch configurations of the top-k Triton kernel (topk_kernels.py) and its launcher.

As for the dense kernels (launch.py), the configuration is a pure function
of C, with no autotuning, so benchmarks/triton_aot_report.py can compile every
configuration that can run: up to WHOLE_ROW_MAX_C a row is held in registers
(BLOCK_C = the next power of two >= C), above it walked in column blocks. A second
launch, the exact-rest pass (topk_kernels.py), redoes the rows the first flagged, in
EXACT_REST_CONFIG; the others return at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from smskd_fast.backends.triton.topk_bitmask import kept_class_bitmask
from smskd_fast.ops import schema
from smskd_fast.backends.triton import kernels, topk_kernels
from smskd_fast.ops.launch_device import TRITON_COMPILE_OPTIONS, on_device_of
from smskd_fast.backends.triton.launch import (allocate_outputs, check_targets, logits_row_alignment,
                                               power_of_two_at_least)

WHOLE_ROW_MAX_C = 4096
# Kept classes gathered per step: a cache keeps tens of classes; k = C walks in steps.
BLOCK_K = 64


@dataclass(frozen=True)
class TopKConfig:
    """_smskd_topk_rows_kernel: one row per program, BLOCK_C columns per step (the whole row when whole_row)."""

    block_c: int
    num_warps: int
    whole_row: bool


COLUMN_BLOCK_CONFIG = TopKConfig(2048, 8, False)
# The exact-rest pass: column blocks whatever C (rare rows; one configuration to compile and check).
EXACT_REST_CONFIG = TopKConfig(1024, 4, False)
# Whole-row widths where BLOCK_C / 256 warps made ptxas spill 4-8 bytes on sm_80 under
# triton 3.6 (1024: smskd+grad fp32; 2048: smskd+grad bf16/fp16). 4096: 8 warps spilled 4-12 bytes
# under 3.6 (smskd+grad fp32 on sm_80 and sm_90), 32 warps 4-8 under 3.8 (smskd, sm_80); with 16
# none of the 876 compiles spills under 3.6 or 3.8 (benchmarks/results/triton_aot_triton3.6_2026-12-06/).
WHOLE_ROW_WARPS_OVERRIDE = {1024: 8, 2048: 16, 4096: 16}


def topk_config(num_classes: int) -> TopKConfig:
    """The row in registers for C <= WHOLE_ROW_MAX_C (2-16 elements per thread), else column blocks.

    C may be a SymInt (see launch.power_of_two_at_least)."""
    if num_classes > WHOLE_ROW_MAX_C:
        return COLUMN_BLOCK_CONFIG
    block_c = power_of_two_at_least(num_classes, 32)  # tiles of [BLOCK_C // 32, 32]
    return TopKConfig(block_c, WHOLE_ROW_WARPS_OVERRIDE.get(block_c, max(1, block_c // 256)), True)


def all_topk_configs() -> Tuple[TopKConfig, ...]:
    """Every configuration that topk_config can return."""
    configs = []
    block_c = 32
    while block_c <= WHOLE_ROW_MAX_C:
        configs.append(topk_config(block_c))
        block_c *= 2
    return (*configs, COLUMN_BLOCK_CONFIG)


def launch_topk_rows(
    student: torch.Tensor,
    target: Optional[torch.Tensor],
    values: torch.Tensor,
    indices: torch.Tensor,
    true_logit: torch.Tensor,
    log_sum_exp: torch.Tensor,
    log_sum_exp_at_temperature: torch.Tensor,
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
    config: Optional[TopKConfig] = None,
    wrap=lambda kernel: kernel,
):
    """Runs the top-k kernel on (N, C) rows; returns (loss, ce, kd, ref, tcp, weight, grad).

    Logits have unit column stride; the top-k tensors may have any float / integer
    dtype (converted to fp32 / int64, contiguous). grad_scale, grad_out, config and
    wrap are as in launch.launch_rows; grad_out may be the student itself.
    """
    num_rows, num_classes = student.shape
    per_row, grad = allocate_outputs(student, compute_grad, grad_out)
    if num_rows == 0:
        return (*per_row, grad)
    with on_device_of(student):
        check_targets(target, num_classes, ignore_index, wrap)
        indices = indices.to(torch.int64).contiguous()
        bits = kept_class_bitmask(indices, num_classes)
        fp32 = [t.to(torch.float32).contiguous()
                for t in (values, true_logit, log_sum_exp, log_sum_exp_at_temperature)]
        # The kept classes' logits, saved by the kernel for its scatter (the student may be the gradient buffer).
        kept_logits = (torch.empty(indices.shape, dtype=torch.float32, device=student.device) if compute_grad
                       else fp32[0])
        exact_rest = torch.empty(num_rows, dtype=torch.int8, device=student.device)  # the rows' flags
        dummy = student  # stands for absent tensors; the kernel never reads it then
        strides = (
            student.stride(0),
            0 if reference is None else reference.stride(0),
            grad.stride(0) if compute_grad else 0,
        )
        chosen = config or topk_config(num_classes)
        if chosen.block_c % 32 or (chosen.whole_row and chosen.block_c < num_classes):
            raise ValueError(f"block_c must be a multiple of 32 (and >= C = {num_classes} for a whole row), "
                             f"got {chosen.block_c}")
        arguments = (
            student, dummy if reference is None else reference, dummy if target is None else target,
            fp32[0], indices, fp32[1], fp32[2], fp32[3], bits, kept_logits, grad if compute_grad else dummy,
            dummy if grad_scale is None else grad_scale, exact_rest, *per_row,
            num_classes, indices.shape[1], *strides,
            float(temperature), float(ce_weight), float(kd_weight), float(ref_weight), int(ignore_index),
        )
        flags = dict(
            HAS_TARGET=target is not None,
            HAS_REFERENCE=reference is not None,
            WEIGHTING=schema.WEIGHTING_CODES[weighting],
            COMPUTE_GRAD=bool(compute_grad),
            HAS_GRAD_SCALE=grad_scale is not None,
            BLOCK_K=BLOCK_K,
            ROW_ALIGN=logits_row_alignment(num_classes, (student, reference, grad if compute_grad else None)),
        )
        kernel = wrap(topk_kernels._smskd_topk_rows_kernel)
        kernel[(num_rows,)](*arguments, **flags, WHOLE_ROW=chosen.whole_row, BLOCK_C=chosen.block_c,
                            T_POWER=kernels.temperature_power(temperature, target is not None, True),
                            EXACT_REST=False, num_warps=chosen.num_warps, **TRITON_COMPILE_OPTIONS)
        kernel[(num_rows,)](*arguments, **flags, WHOLE_ROW=False, BLOCK_C=EXACT_REST_CONFIG.block_c, T_POWER=0,
                            EXACT_REST=True, num_warps=EXACT_REST_CONFIG.num_warps, **TRITON_COMPILE_OPTIONS)
    return (*per_row, grad)
