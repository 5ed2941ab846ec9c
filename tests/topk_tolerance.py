"""Comparison of a kernel's top-k outputs with the float64 reference, for the CUDA top-k tests.

Tolerances come from tests/tolerances.py (fp32 accumulation of values of size
|logit|max, the gradient rounded once to the student's dtype).
"""
from __future__ import annotations

import torch

from tolerances import grad_tolerance, loss_tolerance
from topk_cases import FIELDS


def assert_matches_reference(per_row, grad, expected, expected_grad, student, options, what="", grad_scale=1.0):
    """per_row: the six (N,) outputs in FIELDS order; grad: (N, C) in the student's dtype, or None, written
    with the operators' grad_scale: grad_scale times expected_grad, its entries and their error as much larger."""
    max_abs = float(student.double().abs().nan_to_num(0, 0, 0).max()) if student.numel() else 0.0
    T = options.temperature
    rtol, atol = loss_tolerance(max_abs, T, options.ce_weight + options.kd_weight + options.ref_weight,
                                 student.shape[-1])
    for name, value in zip(FIELDS, per_row):
        torch.testing.assert_close(value.double().cpu(), getattr(expected, name).detach().double(), rtol=rtol,
                                   atol=atol, msg=lambda m: f"{what} {name}: {m}")
    if grad is None:
        return
    assert grad.dtype == student.dtype and grad.shape == student.shape
    scale = (options.ce_weight + T * (options.kd_weight + options.ref_weight)) * abs(grad_scale)
    _, grad_atol = grad_tolerance(student.dtype, max_abs, T, scale)
    torch.testing.assert_close(grad.double().cpu(), grad_scale * expected_grad, rtol=0, atol=grad_atol,
                               msg=lambda m: f"{what} grad: {m}")
