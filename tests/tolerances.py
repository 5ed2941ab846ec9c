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

import math

import torch

FP32_EPS = torch.finfo(torch.float32).eps
SLACK = 16  # ulps: allows a few roundings per term and the vectorised reduction order


def loss_tolerance(max_abs_logit: float, temperature: float, weight_sum: float,
                   num_classes: int) -> tuple[float, float]:
    """(rtol, atol) for per-row loss terms of rows with num_classes logits.

    Two fp32 error sources, each a few ulps (SLACK) per unit of loss weight:
    - the logits' own size: max - s_y and the differences of maxima cancel values of size |x|max,
      and the KD/reference terms carry them as T^2 * (|x|max / T): eps |x|max max(1, T);
    - the log-sum-exps: KD and the reference term are T^2 (E_p[x - z] / T - lse(x/T) + lse(z/T)),
      and each lse(x/T) = max/T + log(sum) with log(sum) in [0, log C] rounds to eps (1 + log C)
      absolute, which T^2 multiplies: eps (1 + log C) max(1, T)^2. With small logits (|x|max/T
      << log C) this term dominates: measured (reference backend, fp32 vs float64, C = 7..1031,
      T = 1..8, logits 0.1..10 randn) up to ~0.9 eps T^2 (1 + log C), which the first term alone
      (16 eps (1 + |x|max) T) did not cover at T = 8, |x|max = 0.3, C = 100 (hypothesis found it).
    """
    lse_term = max(1.0, temperature) ** 2 * (1.0 + math.log(max(num_classes, 1)))
    logit_term = (1.0 + max_abs_logit) * max(1.0, temperature)
    atol = SLACK * FP32_EPS * (logit_term + lse_term) * max(1.0, weight_sum)
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
    return (chunks + 1) * unit_roundoff(dtype) * 2 * abs_sum


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for p significand bits: round-to-nearest moves x by at most u * |x| (normal range)."""
    return torch.finfo(dtype).eps / 2


# The CUDA kernels' fp32 error under --use_fast_math (exp2f -> ex2.approx.ftz.f32, relative error
# <= 2^-22; log2f -> lg2.approx.ftz.f32, absolute error <= 2^-22.6; '/' within 2 ulp; denormals
# flushed), for the dense row kernel (kernels/smskd_row_kernel.cuh), which forms every
# probability as p_c = exp2(fma(x_c - max, k, -log2(sum))) with k = log2(e)/T:
# - the exponent's absolute error is |x_c - max| k (u + 2^-22) (the difference's rounding, k's
#   division) + u |exponent| (the fma) + 2^-22.6 (lg2) + log2(e) e_sum, where e_sum, the sum's
#   relative error, is 2^-22 (ex2) plus its accumulation, ~ sqrt(C / threads) u for random signs of
#   the rounding errors (C / threads serial additions per thread, then a tree); p_c's relative error
#   is ln2 times that, plus 2^-22. With the tests' logits (3 randn, |x| <= X ~ 16) and T = 2.5, the
#   entries that matter (p_c >= 1e-3, exponent within ~10 of 0) carry ~2e-6; entries far below the
#   maximum carry more relatively but are tiny in absolute terms (under every test's atol).
#   A consistent error in k acts as a temperature off by 2^-22 relative: the softmax stays
#   normalised and moves by ~2^-22 times a few log2 units.
#   So the row gradient's fp32 relative error is ~2e-6..3e-6: FP32_GRAD_RTOL = 1e-5 leaves 3x;
#   where the terms a (p_s - onehot) + b (q_s - q_t) + g (q_s - q_r) cancel, the error is relative
#   to the terms (<= (a + 2b + 2g) p), which the tests' atol 2e-6 (1 + T^2) covers.
# - per-row values: ce = (max - s_y) + ln2 log2(sum) errs by u |max - s_y| + 2^-22.6 ln2 + e_sum
#   (~3e-6); KD and the reference term T^2 (dot/sumT + (max_s - max_x)/T + ln2 (log2 sums)) add
#   terms of size <= 2X/T, ~3e-6 before T^2: far inside 2e-5 (1 + T^2) log(C + 2).
# - ftz: probabilities below 2^-126 become 0 (absolute error < 1.2e-38 times a coefficient) and
#   logits below 2^-126 in magnitude read as 0; neither reaches any tolerance here.
# - C = 1: sums are exactly 1 and x - max exactly 0, so with ex2.approx(0) = 1 (PTX's special
#   case) and lg2.approx(1) = 0 every term and the gradient are exactly 0 (checked on the GPU by
#   test_backend_conformance.py::test_one_class_gives_exact_zeros[cuda-*], on the host with the approximations
#   emulated by kernels/tests/fast_math_emulation.h).
# In bf16 and fp16 the gradient's rounding to the dtype (u = 2^-8, 2^-11) dominates all of this.


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


# ---- The backends against the float64 reference (tests/test_backend_conformance.py) ----
#
# Float64 inputs (the cpu backend only; triton and cuda refuse them): the kernel accumulates in
# double, exp from Sleef (1 ulp); only the summation order differs: rtol and atol 1e-10 on per-row
# values, rtol 1e-10 and atol 1e-12 on the gradient.
#
# cpu, fp32 accumulation: exp is ATen's exp_u20 (relative error <= 20 ulp = 2.4e-6), raised to the
# power T when T is an integer (exp(x - m) = exp((x - m)/T)^T), so softmax(s) carries up to about
# 1e-5 relative error: the fp32 gradient rtol 1e-5, atol 2e-6 (entries whose terms cancel); per-row
# values are O(10) in these cases, a few ulps of which is 5e-5 (rtol and atol). bf16/fp16 logits:
# per-row values are fp32 from the same exact inputs, so the fp32 tolerances; the gradient is
# rounded once to the dtype: rtol 2^-8 (bf16: its unit roundoff) and 2^-10 (fp16: twice its unit
# roundoff), atol 1e-5 (bf16) and 1e-6 (fp16) for entries near zero. Checked for T in [0.5, 9].
#
# triton, fp32 accumulation (exp2/log2 of libdevice, or numpy's under the interpreter): per-row
# values of order 10 (with T^2 = 16) agree to 2e-5 (rtol and atol), the fp32 gradient to 2e-6
# (rtol and atol); a bf16/fp16 gradient is the fp32 one rounded once: within one unit in the last
# place of the float64 gradient rounded to the dtype, plus 1e-6, i.e. rtol eps + u (1 + eps)
# against the float64 gradient itself. Checked (before the conformance suite) for T <= 4: the KD
# and reference terms are T^2 times a KL whose fp32 error is fixed, and the gradient T times a
# difference of softmaxes, so beyond T = 4 the value atol grows as (T/4)^2 and the gradient's as T/4.
#
# cuda (--use_fast_math: derivation above, at FP32_GRAD_RTOL): per-row values rtol 1e-4, atol
# 2e-5 (1 + T^2) log(C + 2); the gradient atol 2e-6 (1 + T^2), rtol scaled_grad_rtol. Its top-k
# kernel is held to loss_tolerance and grad_tolerance (the general fp32 derivation above).
#
# Gradients of sum_i v_i L_i (per-row weights v_i, as a mean or a mask gives backward) are the
# kernel's row gradient rounded to the dtype, then scaled by v_i in fp32 and rounded again:
# scaled_grad_rtol(dtype, the backend's fp32 gradient rtol) where that exceeds the one-rounding rtol.

FP32_GRAD_RTOL = 1e-5  # the cuda and cpu kernels' fp32 row gradient, relative (derivations above)
_CPU_GRAD = {torch.float32: (1e-5, 2e-6), torch.bfloat16: (2.0**-8, 1e-5), torch.float16: (2.0**-10, 1e-6)}
_TRITON_VALIDATED_TEMPERATURE = 4.0


def backend_tolerance(backend: str, dtype: torch.dtype, *, temperature: float, num_classes: int, topk: bool,
                      row_weights: bool, max_abs_logit: float, weight_sum: float,
                      grad_scale: float) -> tuple[dict, dict]:
    """(values, gradient) keyword arguments of torch.testing.assert_close for backend's per-row outputs and
    d loss / d student against the float64 reference on the same input values (derivations above).
    grad_scale bounds the gradient's entries (ce + T (kd + ref), times the largest v_i)."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10), dict(rtol=1e-10, atol=1e-12)
    u = unit_roundoff(dtype)
    if backend == "cpu":
        rtol, atol = _CPU_GRAD[dtype]
        if row_weights:
            rtol = max(rtol, scaled_grad_rtol(dtype, FP32_GRAD_RTOL))
        return dict(rtol=5e-5, atol=5e-5), dict(rtol=rtol, atol=atol)
    if backend == "triton":
        beyond = max(1.0, temperature / _TRITON_VALIDATED_TEMPERATURE)
        values = dict(rtol=2e-5, atol=2e-5 * beyond**2)
        if dtype == torch.float32:
            return values, dict(rtol=2e-6, atol=2e-6 * beyond)
        return values, dict(rtol=torch.finfo(dtype).eps * (1 + u) + u, atol=1e-6 * beyond)
    if backend == "cuda":
        if topk:
            rtol, atol = loss_tolerance(max_abs_logit, temperature, weight_sum, num_classes)
            return dict(rtol=rtol, atol=atol), dict(zip(("rtol", "atol"), grad_tolerance(
                dtype, max_abs_logit, temperature, grad_scale)))
        return (dict(rtol=1e-4, atol=2e-5 * (1 + temperature**2) * math.log(num_classes + 2)),
                dict(rtol=scaled_grad_rtol(dtype, FP32_GRAD_RTOL), atol=2e-6 * (1 + temperature**2)))
    raise ValueError(f"no tolerance for backend {backend!r}")


def cross_backend_tolerance() -> dict:
    """Two fp32 kernels against each other (where the float64 reference has no value to give, e.g. the
    gradient at an infinite loss): each is within a few fp32 ulps of values O(1): rtol = atol = 1e-5."""
    return dict(rtol=1e-5, atol=1e-5)


def large_logit_value_tolerance(dtype: torch.dtype) -> dict:
    """Per-row values of logits of magnitude ~1e4 (values O(1e5)): float32 keeps about 7 digits of them,
    rtol 1e-5 and atol 1e-2; float64 agrees to summation order relative to them, rtol 1e-10, atol 1e-8."""
    return dict(rtol=1e-10, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-2)
