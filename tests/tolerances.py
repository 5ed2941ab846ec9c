"""Per-dtype tolerances for comparing a backend with the float64 reference, in one place.

Both sides see the same input values (the low-precision inputs, upcast exactly for
the reference), so what is left is:
- fp32 accumulation: terms such as lse(s) - s_y or T^2 * (sum p(x - z)/T - lse(x/T) + lse(z/T))
  cancel values of size |x|max (times T for the KD and reference terms), so the absolute
  error is a few fp32 ulps of |x|max * max(1, T) per unit of loss weight;
- the gradient's rounding to the input dtype (half an ulp of its largest entry: 2^-8 bf16,
  2^-11 fp16, 2^-24 fp32) plus the same fp32 error propagated through exp.
"""
from __future__ import annotations

import torch

FP32_EPS = torch.finfo(torch.float32).eps
SLACK = 16  # ulps: allows a few roundings per term and the vectorised reduction order


def loss_tolerance(max_abs_logit: float, temperature: float, weight_sum: float) -> tuple[float, float]:
    """(rtol, atol) for per-row loss terms."""
    atol = SLACK * FP32_EPS * (1.0 + max_abs_logit) * max(1.0, temperature) * max(1.0, weight_sum)
    return 1e-5, atol


def grad_tolerance(dtype: torch.dtype, max_abs_logit: float, temperature: float,
                   grad_scale: float) -> tuple[float, float]:
    """(rtol, atol) for d loss / d student, whose entries are at most about grad_scale."""
    rounding = 0.0 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    fp32_error = SLACK * FP32_EPS * (1.0 + max_abs_logit / min(1.0, temperature))
    return 0.0, (rounding + fp32_error) * grad_scale


def linear_logit_bound(hidden_size: int, max_abs_hidden: float, max_abs_weight: float, max_abs_bias: float) -> float:
    """An upper bound on |logit| of hidden @ weight.T + bias: it stands for max_abs_logit when the logits
    are computed in fp32 inside the loss (fused_linear_smskd_loss), whose rounding scales with it."""
    return hidden_size * max_abs_hidden * max_abs_weight + max_abs_bias


def linear_grad_reach(rows: int, vocab: int, max_abs_hidden: float, max_abs_weight: float) -> tuple:
    """How far an error of the per-logit gradient spreads into the (hidden, weight, bias) gradients of a
    linear head: d hidden sums vocab entries times |weight|, d weight rows times |hidden|, d bias rows."""
    return vocab * max(1.0, max_abs_weight), rows * max(1.0, max_abs_hidden), float(rows)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for p significand bits: round-to-nearest moves x by at most u * |x| (normal range)."""
    return torch.finfo(dtype).eps / 2


def scaled_grad_rtol(dtype: torch.dtype, fp32_rtol: float) -> float:
    """Elementwise rtol of d(sum_i v_i loss_i) / d student against float64, for per-row weights v
    (reduction="none"), when the kernel writes each row's gradient g_i during the forward.

    The kernel's fp32 value of g_i carries a relative error e (fp32_rtol: its fp32 arithmetic,
    fast-math exp2/log2 included) and is stored rounded to dtype (<= u |g_i|, u = unit_roundoff);
    backward forms fl(g_i) * v_i in fp32 (2^-24) and rounds it to dtype once more (<= u):
        |got - g_i v_i| <= (2u + e + O(u^2)) |g_i v_i|.
    One rounding (rtol u) holds only for the op's own gradient output (v = 1, no backward).
    Entries where the fp32 terms of g_i cancel, or that fall below fp16's normal range,
    need the caller's absolute term besides.
    """
    u = unit_roundoff(dtype)
    return 2 * u * (1 + u) + 2.0**-24 + fp32_rtol
