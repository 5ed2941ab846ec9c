"""Triton kernel of the fused loss with the teacher in top-k form (smskd_fast/backends/topk.py), gradient included.

One program per row, in three phases:

A. A dense sweep over the student row (and the reference row, when given):
   lse(s) for CE, lse(s/T) for q = softmax(s/T), the reference's statistics as
   in kernels.py, and the rest's sum R = sum_{j not kept} exp((s_j - m)/T)
   over the classes the teacher left out, found from the kept-class bitmask
   (smskd_fast/backends/triton/topk_bitmask.py). R is summed directly, never as D - sum_kept, so
   it has no cancellation; it shares the row maximum m, so a rest lying far below m
   (a confident student at a low temperature) makes it lose precision, then underflow
   to 0 from about 87 T (KD = inf, a NaN gradient). Such a row (p_rest > 0 and
   R < 2^-64) is flagged and left to the exact-rest pass (below). With
   WHOLE_ROW (BLOCK_C >= C) the row is read once and kept in registers for the
   gradient; otherwise it is walked in column blocks with online statistics and
   read again, last block first, for the gradient.
B. A gather of the k kept classes: p_c = exp(v_c/T - lse(t/T)), log q_c, the
   kept part of the KL and the kept mass, and when k < C
   p_rest = max(-expm1(logsumexp(log p_kept)), 0), whose KL term uses
   log q_rest = log R - log D (D: the sum of the whole row, at the same maximum).
C. With COMPUTE_GRAD, the gradient of SPEC.md section 2 with the teacher
   coarsened to p~ (p~_c = p_c kept, p~_j = p_rest q_j / q_rest otherwise):
       g_j = kd_w T (q_j (kept mass + p_rest) - p~_j) + ce_w (softmax(s)_j - [j = y])
             + ref_w T w (q_j - softmax(r/T)_j).
   The dense sweep writes every column as if it were not kept (full-width,
   vectorized stores); then, after a barrier, a scatter rewrites the k kept ones.
   The scatter takes the kept logits from kept_logits (N, k), where phase B put
   them, so the gradient may overwrite the student logits in place (the
   overwrite_student_logits path).
   With HAS_GRAD_SCALE the three weights of g are first multiplied by the op's
   grad_scale (kernels._gradient_weights: one load per row, nothing per element).

The exact-rest pass (EXACT_REST, a second launch of this kernel over the rows flagged by the
first; the others return at once) is the same with the rest's sum taken at the rest's own
maximum m_rest: phase A also keeps m_rest, a sweep sums R at it, log q_rest gains
(m_rest - m)/T, and phase C's one exponential per element is taken at m_rest, where the
rest's p~_j stay representable while q_j underflows (q_j is its multiple). The first launch
writes no gradient for a flagged row, so that the pass reads the student's logits intact
also when the gradient overwrites them. Keeping that code out of the first launch keeps its
registers (several configurations are at ptxas's limit).

Blocks are [BLOCK_C // 32, 32] tiles, one bitmask word per tile row, so a thread
loads each word once for its columns instead of once per column.

Inputs are fp32, bf16 or fp16 logits; the top-k values and the two log-sum-exps are
fp32 and the indices int64 (the launcher converts them); accumulation is fp32.
An index outside [0, C) is clamped for its loads and never sets a bit, so a bad
index gives wrong numbers but no fault; validation refuses it before a launch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from smskd_fast.backends.triton.kernels import (LOG2E, _aligned, _block_exponentials, _cross_entropy, _fp32_scalars,
                                                _gradient_weights, _kl_from_sums, _max, _maximum, _online_kl_sums,
                                                _online_unit_sum, _rescale, _row_cross_sum, _row_sums, _row_terms,
                                                _shift, _store_ignored_row, _store_row_terms, _unit_root,
                                                _unit_softmax, _weighted_diff, sixteen_byte_loads)


# A row whose rest sums to less than this at the row maximum goes to the exact-rest pass. From 2^-64 on, the terms
# a flush to zero drops (below 2^-126, at most C < 2^24 of them) change R by less than 2^-38 of itself, and the
# gradient's p~_j by less than 2^-62 absolute.
EXACT_REST_BELOW = tl.constexpr(2.0**-64)


@triton.jit
def _negative_expm1(x):
    """-expm1(x) = 1 - exp(x), accurate near x = 0 (Kahan's (u - 1) x / log u; no libdevice in the interpreter)."""
    u = tl.exp(x)
    d = u - 1.0
    safe_log = tl.where((u == 1.0) | (d == -1.0), 1.0, tl.log(u))
    return -tl.where(u == 1.0, x, tl.where(d == -1.0, -1.0, d * x / safe_log))


@triton.jit
def _word_maxima(x, TILE_MAXIMA: tl.constexpr):
    """The maxima a [BLOCK_C // 32, 32] tile adds to the running ones: one per 32-column word ([rows, 1]) in
    column blocks, so that no block reduces its maxima over the block (as kernels._smskd_rows_online_kernel's
    packs); with TILE_MAXIMA the tile's own (a scalar): a whole row has no later block to rescale for, and
    rows without 16-byte loads would spread each word over more threads than a block reduction costs."""
    if TILE_MAXIMA:
        m = _max(_max(x, 1), 0)
    else:
        m = _max(x, 1, keep_dims=True)
    return m


@triton.jit
def _tile_sum(x):
    """The sum of a [BLOCK_C // 32, 32] tile."""
    return tl.sum(tl.sum(x, 1), 0)


@triton.jit
def _kept(bits_row, start, num_classes, BLOCK_C: tl.constexpr):
    """Whether each class of the tile starting at column start is kept: bit j % 32 of word j // 32."""
    words = start // 32 + tl.arange(0, BLOCK_C // 32)
    word = tl.load(bits_row + words, mask=words < (num_classes + 31) // 32, other=0)
    return ((word[:, None] >> tl.arange(0, 32)[None, :]) & 1) != 0


@triton.jit
def _kept_block(v_row, i_row, kk, num_kept, num_classes):
    """Kept slots kk of a row: their mask, values (-inf past k) and class indices, clamped into [0, C) for loads."""
    k_mask = kk < num_kept
    v = tl.load(v_row + kk, mask=k_mask, other=float("-inf"))
    index = tl.minimum(tl.maximum(tl.load(i_row + kk, mask=k_mask, other=0), 0), num_classes - 1)
    return k_mask, v, index


@triton.jit
def _rest_sum_at(s_row, bits_row, num_classes, shift, scale_T, BLOCK_C: tl.constexpr):
    """The exact-rest pass's sweep: the sum over the classes not kept of exp2((s - shift) * scale_T)."""
    cols0 = tl.arange(0, BLOCK_C // 32)[:, None] * 32 + tl.arange(0, 32)[None, :]
    total = tl.zeros([BLOCK_C // 32, 32], tl.float32)
    for start in range(0, num_classes, BLOCK_C):
        cols = start + cols0
        s = tl.load(s_row + cols, mask=cols < num_classes, other=float("-inf")).to(tl.float32)
        total += tl.where(_kept(bits_row, start, num_classes, BLOCK_C), 0.0, tl.exp2((s - shift) * scale_T))
    return _tile_sum(total)


@triton.jit
def _sweep_block(s, r, kept, m_s, d_s, d_sT, d_rest, m_rest, m_r, d_rT, a_r, scale_T,
                 HAS_TARGET: tl.constexpr, HAS_REFERENCE: tl.constexpr, T_POWER: tl.constexpr,
                 TILE_MAXIMA: tl.constexpr, EXACT_REST: tl.constexpr):
    """Adds one block to the per-lane online sums (the maxima per word or tile: _word_maxima; the sums per
    lane); with T_POWER (kernels.temperature_power) the T = 1 sums d_s from the exponentials at T; with
    EXACT_REST the rest's maxima m_rest too."""
    if EXACT_REST:
        m_rest = _maximum(m_rest, _word_maxima(tl.where(kept, float("-inf"), s), TILE_MAXIMA))
    m_new = _maximum(m_s, _word_maxima(s, TILE_MAXIMA))
    alpha_T, e_sT, s_rel, student_moved = _block_exponentials(s, m_s, m_new, scale_T)
    d_sT = d_sT * alpha_T + e_sT
    d_rest = d_rest * alpha_T + tl.where(kept, 0.0, e_sT)
    if HAS_TARGET:
        d_s = _online_unit_sum(d_s, m_s, m_new, s, alpha_T, e_sT, T_POWER)
    m_s = m_new
    if HAS_REFERENCE:
        m_new = _maximum(m_r, _word_maxima(r, TILE_MAXIMA))
        d_rT, a_r = _online_kl_sums(r, s_rel, student_moved, m_r, m_new, d_rT, a_r, scale_T)
        m_r = m_new
    return m_s, d_s, d_sT, d_rest, m_rest, m_r, d_rT, a_r


@triton.jit
def _gradient(s, r, is_target, teacher_scale, teacher_p, ms_s, log2d_s, log2d_sT, unit_root, ms_r, log2d_rT,
              total_mass, w, temperature, ce_weight, kd_weight, ref_weight, u_shift, q_scale,
              HAS_TARGET: tl.constexpr, HAS_REFERENCE: tl.constexpr, T_POWER: tl.constexpr,
              SHIFTED: tl.constexpr):
    """d loss_i / d s on a block or on the gathered kept classes, with p~ = q * teacher_scale + teacher_p;
    softmax(s) by _unit_softmax. SHIFTED (the exact-rest pass's dense sweep): one exponential per element
    e = exp2((s - u_shift) scale_T - log2 D), q = e * q_scale and p~ = e * teacher_scale + teacher_p."""
    scale_T = LOG2E / temperature
    if SHIFTED:
        e = tl.exp2((s - u_shift) * scale_T - log2d_sT)
        q = e * q_scale
        grad = (temperature * kd_weight) * (q * total_mass - (e * teacher_scale + teacher_p))
    else:
        q = tl.exp2((s - ms_s) * scale_T - log2d_sT)
        grad = (temperature * kd_weight) * (q * (total_mass - teacher_scale) - teacher_p)
    if HAS_TARGET:
        p_s = _unit_softmax(s, q, ms_s, log2d_s, unit_root, T_POWER)
        grad += ce_weight * (p_s - tl.where(is_target, 1.0, 0.0))
    if HAS_REFERENCE:
        p_r = tl.exp2((r - ms_r) * scale_T - log2d_rT)
        grad += (temperature * ref_weight * w) * (q - p_r)
    return grad


@triton.jit
def _load_block(s_row, r_row, cols, num_classes, HAS_REFERENCE: tl.constexpr, EVICT: tl.constexpr):
    """A tile of the student (and reference) row, -inf past C, and its mask.

    EVICT as in kernels.py: the first sweep's reads evict_last (the second
    sweep re-reads the row, last block first), the second sweep's evict_first.
    """
    mask = cols < num_classes
    s = tl.load(s_row + cols, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    r = s
    if HAS_REFERENCE:
        r = tl.load(r_row + cols, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    return s, r, mask


@triton.jit
def _smskd_topk_rows_kernel(
    student_ptr, reference_ptr, target_ptr, values_ptr, indices_ptr, true_logit_ptr, lse_ptr, lse_T_ptr,
    bits_ptr, kept_logits_ptr, grad_ptr, grad_scale_ptr, exact_rest_ptr,
    loss_ptr, ce_ptr, kd_ptr, ref_ptr, tcp_ptr, weight_ptr,
    num_classes, num_kept, student_stride, reference_stride, grad_stride,
    temperature, ce_weight, kd_weight, ref_weight, ignore_index,
    HAS_TARGET: tl.constexpr, HAS_REFERENCE: tl.constexpr, WEIGHTING: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, WHOLE_ROW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ROW_ALIGN: tl.constexpr, T_POWER: tl.constexpr, EXACT_REST: tl.constexpr,
):
    """One row per program: phases A, B and C of the module docstring; exact_rest_ptr: a flag per row (int8),
    written by the first launch, read by the exact-rest pass (EXACT_REST)."""
    temperature, ce_weight, kd_weight, ref_weight = _fp32_scalars(temperature, ce_weight, kd_weight, ref_weight)
    num_classes, student_stride, reference_stride, _, grad_stride = _aligned(
        num_classes, student_stride, reference_stride, reference_stride, grad_stride, ROW_ALIGN)
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * student_stride
    r_row = reference_ptr + row * reference_stride
    bits_row = bits_ptr + row * ((num_classes + 31) // 32)
    v_row = values_ptr + row * num_kept
    i_row = indices_ptr + row * num_kept
    kept_logits_row = kept_logits_ptr + row * num_kept
    cols0 = tl.arange(0, BLOCK_C // 32)[:, None] * 32 + tl.arange(0, 32)[None, :]
    kk0 = tl.arange(0, BLOCK_K)
    scale_T = LOG2E / temperature

    y = tl.zeros([], dtype=tl.int64)
    valid = True
    if HAS_TARGET:
        y = tl.load(target_ptr + row).to(tl.int64)
        valid = y != ignore_index
    if EXACT_REST:  # only the rows the first launch flagged
        valid = valid & (tl.load(exact_rest_ptr + row) != 0)

    if valid:
        # Phase A: the dense sweep.
        element_bits: tl.constexpr = student_ptr.dtype.element_ty.primitive_bitwidth
        TILE_MAXIMA: tl.constexpr = WHOLE_ROW or not sixteen_byte_loads(ROW_ALIGN, element_bits)
        if TILE_MAXIMA:
            m_s = tl.full([], float("-inf"), tl.float32)
        else:
            m_s = tl.full([BLOCK_C // 32, 1], float("-inf"), tl.float32)
        m_r = m_s
        d_s = tl.zeros([BLOCK_C // 32, 32], tl.float32)
        d_sT = tl.zeros([BLOCK_C // 32, 32], tl.float32)
        d_rest = tl.zeros([BLOCK_C // 32, 32], tl.float32)
        m_rest = m_s
        d_rT = tl.zeros([BLOCK_C // 32, 32], tl.float32)
        a_r = tl.zeros([BLOCK_C // 32, 32], tl.float32)
        if WHOLE_ROW:
            s, r, mask = _load_block(s_row, r_row, cols0, num_classes, HAS_REFERENCE, "")
            kept = _kept(bits_row, 0, num_classes, BLOCK_C)
            m_s, d_s, d_sT, d_rest, m_rest, m_r, d_rT, a_r = _sweep_block(
                s, r, kept, m_s, d_s, d_sT, d_rest, m_rest, m_r, d_rT, a_r, scale_T, HAS_TARGET, HAS_REFERENCE,
                T_POWER, TILE_MAXIMA, EXACT_REST)
        else:
            for start in range(0, num_classes, BLOCK_C):
                s, r, mask = _load_block(s_row, r_row, start + cols0, num_classes, HAS_REFERENCE, "evict_last")
                kept = _kept(bits_row, start, num_classes, BLOCK_C)
                m_s, d_s, d_sT, d_rest, m_rest, m_r, d_rT, a_r = _sweep_block(
                    s, r, kept, m_s, d_s, d_sT, d_rest, m_rest, m_r, d_rT, a_r, scale_T, HAS_TARGET, HAS_REFERENCE,
                    T_POWER, TILE_MAXIMA, EXACT_REST)
        if TILE_MAXIMA:  # one maximum per stream: the sums are at it
            ms_s = tl.where(m_s == float("-inf"), 0.0, m_s)
            ms_r = tl.where(m_r == float("-inf"), 0.0, m_r)
            D_sT = _tile_sum(d_sT)
            D_s = _tile_sum(d_s)
            D_rT = _tile_sum(d_rT)
            rest_sum = _tile_sum(d_rest)
        else:  # the words' sums rescaled to the row's maxima
            ms_s, D_s, D_sT, rest_sum = _row_sums(m_s, d_s, d_sT, d_rest, scale_T)
            ms_r, _unit_sum_r, D_rT, _same_D_rT = _row_sums(m_r, d_rT, d_rT, d_rT, scale_T)  # (r: only sums at T)
            A_r = _row_cross_sum(m_r, a_r, d_rT, ms_s - _shift(m_s), scale_T)
        log_D_sT = tl.log(D_sT)
        if TILE_MAXIMA:
            A_r = _tile_sum(a_r)
        kl_r = _kl_from_sums(A_r, D_rT, log_D_sT, temperature)

        # Phase B: the kept classes.
        lse_T = tl.load(lse_T_ptr + row)
        kept_kl = tl.zeros([BLOCK_K], tl.float32)
        kept_mass = tl.zeros([BLOCK_K], tl.float32)
        m_p = tl.full([], float("-inf"), tl.float32)
        d_p = tl.zeros([BLOCK_K], tl.float32)
        for k_start in range(0, num_kept, BLOCK_K):
            kk = k_start + kk0
            k_mask, v, index = _kept_block(v_row, i_row, kk, num_kept, num_classes)
            log_p = v / temperature - lse_T
            p = tl.exp(log_p)
            s_c = tl.load(s_row + index, mask=k_mask, other=0.0).to(tl.float32)
            if COMPUTE_GRAD:  # for the scatter: the student's own column may be overwritten by then
                tl.store(kept_logits_row + kk, s_c, mask=k_mask)
            log_q = (s_c - ms_s) / temperature - log_D_sT  # relative to the maximum first, as for CE
            kept_kl += _weighted_diff(p, log_p, log_q)  # p = 0 (masked lane) adds 0; NaN propagates
            kept_mass += p
            m_new = _maximum(m_p, _max(log_p, 0))
            alpha, mp = _rescale(m_p, m_new, LOG2E)  # exp(m_p - m_new)
            d_p = d_p * alpha + tl.exp(log_p - mp)
            m_p = m_new
        mass_kept = tl.sum(kept_mass, 0)
        log_kept = tl.where(m_p == float("-inf"), 0.0, m_p) + tl.log(tl.sum(d_p, 0))
        p_rest = tl.where(num_kept < num_classes, tl.maximum(_negative_expm1(log_kept), 0.0), 0.0)
        has_rest = p_rest > 0
        safe_p_rest = tl.where(has_rest, p_rest, 1.0)
        rest_shift = ms_s  # where R is summed: the row's maximum, or in the exact-rest pass the rest's own
        if EXACT_REST:
            if not TILE_MAXIMA:
                m_rest = _max(m_rest)
            rest_shift = tl.where(m_rest == float("-inf"), ms_s, m_rest)  # a rest of -inf logits: R = 0 still
            rest_sum = _rest_sum_at(s_row, bits_row, num_classes, rest_shift, scale_T, BLOCK_C)
        else:
            # The flag, and no gradient here for a flagged row (the exact-rest pass rewrites it).
            exact_rest = has_rest & (rest_sum < EXACT_REST_BELOW)
            tl.store(exact_rest_ptr + row, exact_rest.to(tl.int8))
        log_q_rest = tl.log(rest_sum) - tl.log(D_sT)
        if EXACT_REST:
            log_q_rest += (rest_shift - ms_s) / temperature
        rest_kl = tl.where(has_rest, p_rest * (tl.log(safe_p_rest) - log_q_rest), 0.0)
        # p~_j / e_j on the rest: p_rest / q_rest (e_j = q_j) in the first launch, p_rest D / R at m_rest in the
        # exact-rest pass.
        rest_scale = tl.where(has_rest, p_rest * (D_sT / rest_sum), 0.0)

        s_y = tl.zeros([], tl.float32)
        t_y = tl.zeros([], tl.float32)
        lse_t = tl.zeros([], tl.float32)
        if HAS_TARGET:
            s_y = tl.load(s_row + y).to(tl.float32)
            t_y = tl.load(true_logit_ptr + row)
            lse_t = tl.load(lse_ptr + row)
        loss, ce, kd, ref, tcp, w = _row_terms(  # TCP from the cache's true-class logit and lse(t)
            _cross_entropy(s_y - ms_s, ms_s, D_s), tl.sum(kept_kl, 0) + rest_kl, tl.exp(t_y - lse_t), kl_r,
            temperature, ce_weight, kd_weight, ref_weight,
            HAS_TARGET, True, HAS_REFERENCE, WEIGHTING)
        _store_row_terms(row, loss_ptr, ce_ptr, kd_ptr, ref_ptr, tcp_ptr, weight_ptr, loss, ce, kd, ref, tcp, w)

        if COMPUTE_GRAD:
            write = True
            if not EXACT_REST:  # a flagged row's gradient is the exact-rest pass's (which reads the logits intact)
                write = exact_rest == 0
            if write:
                # Phase C: the dense sweep writes every class as if it were not kept ...
                g_ce_weight, g_kd_weight, g_ref_weight = _gradient_weights(
                    grad_scale_ptr, ce_weight, kd_weight, ref_weight, HAS_GRAD_SCALE)
                g_row = grad_ptr + row * grad_stride
                total_mass = mass_kept + p_rest
                log2d_s = tl.log2(D_s)
                log2d_sT = tl.log2(D_sT)
                log2d_rT = tl.log2(D_rT)
                unit_root = _unit_root(log2d_s, log2d_sT, T_POWER)  # the column-block sweep's and the scatter's
                q_scale = 1.0
                if EXACT_REST:
                    q_scale = tl.exp2((rest_shift - ms_s) * scale_T)
                if WHOLE_ROW:
                    # T_POWER 0 here: the squared softmax(s) made ptxas spill the fp32 whole-row kernel of 512
                    # columns on sm_90 (56 registers, 4 bytes); the sweep above still takes the T = 1 sums squared,
                    # and the kept classes' scatter below still takes softmax(s) from q
                    grad = _gradient(s, r, cols0 == y, rest_scale, 0.0, ms_s, log2d_s, log2d_sT, unit_root, ms_r, log2d_rT,
                                     total_mass, w, temperature, g_ce_weight, g_kd_weight, g_ref_weight, rest_shift,
                                     q_scale, HAS_TARGET, HAS_REFERENCE, 0, EXACT_REST)
                    tl.store(g_row + cols0, grad.to(grad_ptr.dtype.element_ty), mask=mask)
                else:
                    num_blocks = tl.cdiv(num_classes, BLOCK_C)
                    for back in range(0, num_blocks):
                        cols = (num_blocks - 1 - back) * BLOCK_C + cols0
                        s, r, mask = _load_block(s_row, r_row, cols, num_classes, HAS_REFERENCE, "evict_first")
                        grad = _gradient(s, r, cols == y, rest_scale, 0.0, ms_s, log2d_s, log2d_sT, unit_root, ms_r, log2d_rT,
                                         total_mass, w, temperature, g_ce_weight, g_kd_weight, g_ref_weight, rest_shift,
                                         q_scale, HAS_TARGET, HAS_REFERENCE, T_POWER, EXACT_REST)
                        tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
                # ... then rewrites the kept ones by a scatter, after every thread's sweep stores.
                tl.debug_barrier()
                for k_start in range(0, num_kept, BLOCK_K):
                    kk = k_start + kk0
                    k_mask, v, index = _kept_block(v_row, i_row, kk, num_kept, num_classes)
                    s_c = tl.load(kept_logits_row + kk, mask=k_mask, other=0.0)
                    r_c = s_c
                    if HAS_REFERENCE:
                        r_c = tl.load(r_row + index, mask=k_mask, other=0.0).to(tl.float32)
                    p_c = tl.exp(v / temperature - lse_T)
                    kept_grad = _gradient(s_c, r_c, index == y, 0.0, p_c, ms_s, log2d_s, log2d_sT, unit_root, ms_r, log2d_rT,
                                          total_mass, w, temperature, g_ce_weight, g_kd_weight, g_ref_weight, ms_s,
                                          1.0, HAS_TARGET, HAS_REFERENCE, T_POWER, False)
                    tl.store(g_row + index, kept_grad.to(grad_ptr.dtype.element_ty), mask=k_mask)
    else:
        if not EXACT_REST:
            tl.store(exact_rest_ptr + row, tl.zeros([], tl.int8))
            _store_ignored_row(row, loss_ptr, ce_ptr, kd_ptr, ref_ptr, tcp_ptr, weight_ptr, grad_ptr, grad_stride,
                               num_classes, cols0, BLOCK_C, COMPUTE_GRAD)
