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


def chunked_accumulation_excess(chunks: int, dtype: torch.dtype, abs_sum: torch.Tensor) -> torch.Tensor:
    """How much further from the exact value a sum accumulated in `dtype` over `chunks` chunks (one in-place
    rounding of the running total per chunk, fused_linear's weight gradient) may be than the same sum in
    one chunk (one rounding), entrywise; abs_sum = sum over rows of |term| (e.g. |d logits|^T |hidden|).

    Both sum the same per-row terms (each chunk's rows get bitwise the logits they get unchunked); call
    their exact total X. Partial sums are bounded by abs_sum S, so K roundings to `dtype` (unit roundoff
    u = eps / 2) move the chunked result at most K u S from X, and the one-chunk result is within u S of
    X: |chunked - exact| <= |one chunk - exact| + (K + 1) u S. The products inside each matmul are exact
    in its float32 accumulator (bf16 x bf16) and their float32 sums add ~chunk rows x 2^-24 relative,
    below 2^-9 by far. S is taken from the float64 row gradients, which differ from the low-precision
    ones by the logits' rounding (~1%); a factor 2 covers that.
    """
    unit_roundoff = torch.finfo(dtype).eps / 2
    return (chunks + 1) * unit_roundoff * 2 * abs_sum
