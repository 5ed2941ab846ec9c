// The fused row kernel of the top-k teacher form (smskd_fast/backends/topk.py; the CPU
// twin is csrc/cpu/loss_rows_topk.cpp), built from the dense kernel's pieces
// (smskd_row_kernel.cuh: layouts, packed sweeps, online statistics, merges).
//
// Per row, by the threads that own it:
//   A. one dense sweep over the student (and reference) row: lse(s), lse(s/T),
//      the rest's sum R = sum_{j not kept} exp(s_j/T - m) (kept bitmask), and
//      the reference's statistics; merged across the row's threads;
//   B. a gather of the k kept classes: p_c = exp(v_c/T - lse_T), their KL
//      terms against log q_c and their mass, and lse of log p_c for
//      p_rest = max(-expm1(lse), 0); merged again;
//   C. with a gradient: a dense sweep g_j = kd_w T (q_j M - p~_j) + CE and
//      reference terms, p~_j = p_rest q_j / q_rest off the kept classes, then
//      (after a barrier) the kept classes' entries again with p~_c = p_c; all
//      times the launch's grad_scale, folded into the coefficients once per row.
// R shares the row maximum m, so a rest lying far below it (a confident student at a
// low temperature) loses precision, then underflows to 0 from about 87 T (KD = inf, a
// NaN gradient). Such a row (p_rest > 0, R < 2^-64) is flagged (TopKParams::exact_rest)
// and redone by the exact-rest kernel (smskd_topk_exact_rest_kernel, kExactRest), which
// also keeps the rest's largest logit in A, sums R again at it, and takes C's one
// exponential per column there, where the rest's p~_j stay representable while q_j
// underflows (q_j is its multiple). That code stays out of the main kernels, several of
// which are at their register limit.
// No PyTorch dependency; the per-thread arithmetic (TopKRowMath) is host and
// device code, tested on the CPU by kernels/tests/topk_rows_host.cu.
//
// As in the dense kernel, the student's and reference's terms are written relative to
// their maxima (log q_c = (s_c - max)/T - log sumT, not s_c/T - lse(s/T)), and a KL sum is
// scaled by 1/T once, after the difference of maxima is added to it: a row with one class
// then gives exactly 0 for every term and the gradient, whatever nvcc fuses into an FFMA.
#pragma once

#include "smskd_row_kernel.cuh"

namespace smskd {
namespace kernels {

// Scalars and pointers of one top-k launch (from smskd_loss_rows_topk_args).
struct TopKParams {
  int64_t rows, cols, k;
  int64_t student_stride, reference_stride, target_stride, mask_stride, grad_stride;
  const float* grad_scale;  // NULL: 1 (smskd_loss_rows_topk_args.grad_scale)
  const int64_t* target;
  const float* values;
  const int64_t* indices;
  const uint32_t* mask;
  const float* true_logit;
  const float* lse;
  const float* lse_t;
  SMSKD_PER_ROW_OUTPUTS(SMSKD_PER_ROW_OUTPUT_POINTER)
  float temperature, ce_weight, kd_weight, ref_weight;
  smskd_weighting weighting;
  int64_t ignore_index;
  bool vectorized;  // student, reference and grad rows start at the same offset modulo 16 bytes
  uint8_t* exact_rest;  // rows flags: written by the main kernel, read by the exact-rest kernel
};

// A row whose rest sums to less than this at the row maximum is redone by the exact-rest kernel. From 2^-64 on,
// the terms --use_fast_math flushes to zero (below 2^-126, at most C < 2^24 of them) change R by less than 2^-38
// of itself, and the gradient's p~_j by less than 2^-62 absolute.
constexpr float kExactRestBelow = 0x1p-64f;

// The exact-rest kernel's threads per row (a block per row; no minimum of blocks per SM, so no register cap).
constexpr int kExactRestThreads = 256;

// The rest's sum R = sum_{j not kept} exp((s_j - shift)/T) and where it was taken: the row's maximum
// (sweep A's s.dot) or, in the exact-rest kernel, the rest's own.
struct RestSum {
  float shift = 0.0f;
  float sum = 0.0f;
};

// Sweep A: the student's statistics (s.dot is R, the rest's sum at T) and the reference's.
struct TopKRowStats {
  StreamStats s, r;
};

// Gather B: lse of log p_c over the kept classes (in lse.max / lse.sum1), sum_c p_c (log p_c - log q_c)
// and sum_c p_c over those with p_c != 0 (NaN included: it propagates).
struct KeptStats {
  StreamStats lse;
  float kl = 0.0f;
  float mass = 0.0f;
};

// Per-row outputs and what the gradient needs: its coefficients, the student's and reference's
// maxima and the log2 of their sums, so that softmax(s/T)_j = exp2((s_j - max_s) kT - log2_sT).
struct TopKRowResult {
#define SMSKD_RESULT_FIELD(name) float name = 0.0f;
  SMSKD_PER_ROW_OUTPUTS(SMSKD_RESULT_FIELD)  // the per-row outputs
#undef SMSKD_RESULT_FIELD
  float a = 0.0f, b = 0.0f, g = 0.0f;  // ce_w, kd_w T, ref_w T w (times grad_scale: with_gradient_scale)
  float total_mass = 0.0f;             // kept mass + p_rest
  float p_rest = 0.0f;
  float max_s = 0.0f, max_r = 0.0f;
  float log2_s = 0.0f, log2_sT = 0.0f, log2_rT = 0.0f, log2_rest = 0.0f;  // log2 of sum1, sumT, R
  float unit_root = 0.0f;  // kPower != 0: unit_temperature_root, for unit_softmax (as RowResult's)
  // p_rest / q_rest (0 without rest mass; +inf when R underflowed to 0): on the rest the teacher's p~_j =
  // q_j rest_scale, a multiply instead of an exponential per column, as the Triton kernel forms it.
  float rest_scale = 0.0f;
  // The exact-rest kernel's dense sweep takes e_j = exp2((s_j - u_shift) kT - log2_sT) at the rest's maximum
  // u_shift, with q_j = e_j q_scale and p~_j = e_j rest_scale on the rest (rest_scale = p_rest sumT / R at u_shift).
  float u_shift = 0.0f, q_scale = 1.0f;
  // The main kernel's flag: the row is left to the exact-rest kernel (rest mass, and R below kExactRestBelow).
  bool exact_rest = false;
};

// a / b correctly rounded on the device too, whatever --use_fast_math makes of `/`: log p_c =
// v_c/T - lse_t must use the v_c/T that topk.py's lse_t was formed from (0 for one kept class).
SMSKD_HD float divide_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

SMSKD_HD int64_t clamp_class(int64_t index, int64_t cols) { return index < 0 ? 0 : index >= cols ? cols - 1 : index; }

// Kept bits of columns [column, column + N) (N <= 32), bit e for column + e: one or
// two word loads per pack instead of one per element.
template <int N>
SMSKD_HD uint32_t kept_bits(const uint32_t* mask_row, int64_t column) {
  const int64_t word = column >> 5;
  const int shift = static_cast<int>(column & 31);
  uint64_t bits = mask_row[word];
  if (shift + N > 32) bits |= static_cast<uint64_t>(mask_row[word + 1]) << 32;
  return static_cast<uint32_t>(bits >> shift);
}

// The two statistics types' streams for the two-step merge (smskd_row_kernel.cuh,
// merge_row_statistics): the student's (and reference's) sweep statistics, then the kept classes'.
template <bool kTarget, bool kRef>
struct TopKRowStreams {
#pragma nv_exec_check_disable
  template <typename A, typename B, typename F>
  SMSKD_HD static void each(A& a, B& b, F&& f) {
    f(a.s, b.s, Sums<kTarget, true, Dot::kWeighted>{});
    if constexpr (kRef) f(a.r, b.r, Sums<false, true, Dot::kCross>{});
  }
  template <typename A, typename B, typename F>
  SMSKD_HD static void each_plain(A&, B&, F&&) {}
  template <typename Stats>
  SMSKD_HD static void follow_student(Stats& st, const Stats& row) {
    if constexpr (kRef) kernels::follow_student(st.r, shift_of(row.s) - shift_of(st.s));
  }
};

// The exact-rest kernel's rest maximum (a stream of no sums), and its sum of the rest at it (added as it is).
struct RestMaxStreams : WithoutCrossDots {
#pragma nv_exec_check_disable
  template <typename A, typename B, typename F>
  SMSKD_HD static void each(A& a, B& b, F&& f) {
    f(a, b, Sums<false, false, Dot::kNone>{});
  }
  template <typename A, typename B, typename F>
  SMSKD_HD static void each_plain(A&, B&, F&&) {}
};
struct RestSumStreams : WithoutCrossDots {
  template <typename A, typename B, typename F>
  SMSKD_HD static void each(A&, B&, F&&) {}
#pragma nv_exec_check_disable
  template <typename A, typename B, typename F>
  SMSKD_HD static void each_plain(A& a, B& b, F&& f) {
    f(a.sum, b.sum);
  }
};

// The log-sum-exp of the kept classes' log p (lse.max, lse.sum1), and kl and mass added as they are.
struct KeptStreams : WithoutCrossDots {
#pragma nv_exec_check_disable
  template <typename A, typename B, typename F>
  SMSKD_HD static void each(A& a, B& b, F&& f) {
    f(a.lse, b.lse, Sums<true, false, Dot::kNone>{});
  }
#pragma nv_exec_check_disable
  template <typename A, typename B, typename F>
  SMSKD_HD static void each_plain(A& a, B& b, F&& f) {
    f(a.kl, b.kl);
    f(a.mass, b.mass);
  }
};

// The arithmetic of one row of the top-k form, independent of how threads share it. kPower: the
// launch's temperature_power for rows with a target (softmax(s) and its sums from the exponentials
// at T, as RowMath does), else 0. kExactRest: the exact-rest kernel's (the module comment).
template <typename T, bool kTarget, bool kRef, int kPower = 0, bool kExactRest = false>
struct TopKRowMath {
  static_assert(kPower == 0 || kTarget, "kPower needs a target");
  static_assert(!kExactRest || kPower == 0, "the exact-rest kernel takes every exponential itself");
  const T* s_row;
  const T* r_row;
  const uint32_t* mask_row;
  const float* values_row;
  const int64_t* indices_row;
  int64_t cols, k;
  float temperature, invT, kT, lse_t;
  static constexpr float k1 = kLog2e;

  SMSKD_HD TopKRowMath(const TopKParams& prm, const T* student, const T* reference, int64_t row)
      : s_row(student + row * prm.student_stride),
        r_row(kRef ? reference + row * prm.reference_stride : nullptr),
        mask_row(prm.mask + row * prm.mask_stride),
        values_row(prm.values + row * prm.k),
        indices_row(prm.indices + row * prm.k),
        cols(prm.cols),
        k(prm.k),
        temperature(prm.temperature),
        invT(1.0f / prm.temperature),
        kT(kLog2e / prm.temperature),
        lse_t(prm.lse_t[row]) {}

  // Sweep A over P packs of N columns, pack p starting at column c + p * stride; with kExactRest also the
  // rest's largest logit (rest_max.max).
  template <int P, int N>
  SMSKD_HD void accumulate(TopKRowStats& st, StreamStats& rest_max, int64_t c, int64_t stride) const {
    constexpr int M = P * N;
    float s[M], r[M], d[M];
    load_chunk<P, N>(s_row, c, stride, s);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const uint32_t kept = kept_bits<N>(mask_row, c + p * stride);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        d[p * N + e] = (kept >> e) & 1u ? 0.0f : 1.0f;
        if constexpr (kExactRest) rest_max.max = max_or_nan(rest_max.max, (kept >> e) & 1u ? -INFINITY : s[p * N + e]);
      }
    }
    const float student_shift = shift_of(st.s);
    add_values<kTarget, true, Dot::kWeighted, kPower>(st.s, s, d, k1, kT);  // dot: the rest's sum R
    if constexpr (kRef) {
      load_chunk<P, N>(r_row, c, stride, r);
      follow_student(st.r, relative_to_student(st.s, student_shift, s, d));  // d: for the cross dot (Dot::kCross)
      add_values<false, true, Dot::kCross>(st.r, r, d, k1, kT);
    }
  }

  // The exact-rest kernel's second sweep: the rest's sum at shift, over P packs of N columns.
  template <int P, int N>
  SMSKD_HD void accumulate_rest(RestSum& acc, int64_t c, int64_t stride) const {
    constexpr int M = P * N;
    float s[M];
    load_chunk<P, N>(s_row, c, stride, s);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const uint32_t kept = kept_bits<N>(mask_row, c + p * stride);
#pragma unroll
      for (int e = 0; e < N; ++e) acc.sum += (kept >> e) & 1u ? 0.0f : exp2f((s[p * N + e] - acc.shift) * kT);
    }
  }

  // log p_c of kept entry c and its clamped class.
  SMSKD_HD float log_p(int64_t c) const { return divide_rn(values_row[c], temperature) - lse_t; }
  SMSKD_HD int64_t kept_class(int64_t c) const { return clamp_class(indices_row[c], cols); }

  // Gather B: kept entries lane, lane + threads, ... of the row, given the merged sweep A.
  SMSKD_HD void gather(KeptStats& ks, const TopKRowStats& st, int lane, int threads) const {
    const float log_sumT = logf(st.s.sumT);
    for (int64_t c = lane; c < k; c += threads) {
      const float lp[1] = {log_p(c)};
      add_values<true, false, Dot::kNone>(ks.lse, lp, lp, k1, kT);
      const float p = expf(lp[0]);
      if (p != 0.0f) {  // p = 0 adds nothing; NaN propagates, as in topk.py
        const float log_q = (to_float(s_row[kept_class(c)]) - st.s.max) * invT - log_sumT;
        ks.kl += p * (lp[0] - log_q);
        ks.mass += p;
      }
    }
  }

  // The row's outputs from the merged statistics (csrc/cpu/loss_rows_topk.cpp's formulas); rest: R and its shift
  // (the main kernel's: st.s.max and st.s.dot).
  SMSKD_HD TopKRowResult finish(const TopKRowStats& st, const KeptStats& ks, const RestSum& rest, float s_y,
                                float true_logit, float lse_teacher, const TopKParams& prm) const {
    TopKRowResult res;
    const float T2 = temperature * temperature;
    res.max_s = st.s.max;
    res.max_r = kRef ? st.r.max : 0.0f;
    res.log2_s = kTarget ? log2f(st.s.sum1) : 0.0f;
    res.log2_sT = log2f(st.s.sumT);
    res.log2_rT = kRef ? log2f(st.r.sumT) : 0.0f;
    res.ce = kTarget ? cross_entropy(res.max_s, s_y, res.log2_s) : 0.0f;
    res.unit_root = unit_temperature_root<kPower>(res.log2_sT, res.log2_s);
    float rest_kl = 0.0f;
    if (k < cols) {
      const float log_kept = ks.lse.max + logf(ks.lse.sum1);
      res.p_rest = fmaxf(-expm1f(log_kept), 0.0f);
      if (res.p_rest > 0.0f) {
        res.log2_rest = log2f(rest.sum);  // R at rest.shift; -inf if R = 0
        if constexpr (kExactRest) {  // log2 q_rest = (shift - max) kT + log2 R - log2 sumT
          const float drop = (rest.shift - res.max_s) * kT;
          rest_kl = res.p_rest * (logf(res.p_rest) - (drop + res.log2_rest - res.log2_sT) * kLn2);
          res.u_shift = rest.shift;
          res.q_scale = exp2f(drop);
        } else {
          rest_kl = res.p_rest * (logf(res.p_rest) - (res.log2_rest - res.log2_sT) * kLn2);  // log q_rest
          res.exact_rest = rest.sum < kExactRestBelow;
        }
        res.rest_scale = res.p_rest * exp2f(res.log2_sT - res.log2_rest);
      }
    }
    res.kd = T2 * (ks.kl + rest_kl);
    res.tcp = kTarget ? expf(true_logit - lse_teacher) : 0.0f;
    if (prm.weighting == SMSKD_WEIGHT_CONSTANT) {
      res.weight = 1.0f;
    } else if (kTarget) {
      res.weight = prm.weighting == SMSKD_WEIGHT_TCP ? res.tcp : 1.0f - res.tcp;
    }
    // KL(p_r||q) = [sum_c p_r,c ((r_c - max_r) - (s_c - max_s))] / T + log(sumT_s) - log(sumT_r)
    res.ref = kRef ? T2 * res.weight * ((st.r.dot / st.r.sumT) * invT + (res.log2_sT - res.log2_rT) * kLn2) : 0.0f;
    res.loss = prm.ce_weight * res.ce + prm.kd_weight * res.kd + prm.ref_weight * res.ref;
    res.a = kTarget ? prm.ce_weight : 0.0f;
    res.b = temperature * prm.kd_weight;
    res.g = kRef ? temperature * prm.ref_weight * res.weight : 0.0f;
    res.total_mass = ks.mass + res.p_rest;
    return res;
  }

  // d loss / d s_j given s_j, r_j and the teacher's p~_j = q_j teacher_scale + teacher_p (the rest:
  // res.rest_scale and 0; a kept class: 0 and its p_j). kShifted (the exact-rest kernel's dense sweep): from
  // e_j at res.u_shift, q_j = e_j res.q_scale and p~_j = e_j teacher_scale + teacher_p.
  template <bool kShifted = false>
  SMSKD_HD float gradient_at(const TopKRowResult& res, float s, float r, bool is_target, float teacher_scale,
                             float teacher_p) const {
    const float zs = s - res.max_s;
    float q, v;
    if constexpr (kShifted) {
      const float e = exp2f(fmaf(s - res.u_shift, kT, -res.log2_sT));
      q = e * res.q_scale;
      v = res.b * (q * res.total_mass - (e * teacher_scale + teacher_p));
    } else {
      q = exp2f(fmaf(zs, kT, -res.log2_sT));
      v = res.b * (q * res.total_mass - (q * teacher_scale + teacher_p));
    }
    if (kTarget) v += res.a * (unit_softmax<kPower>(q, zs, k1, res.log2_s, res.unit_root) - (is_target ? 1.0f : 0.0f));
    if (kRef) v += res.g * (q - exp2f(fmaf(r - res.max_r, kT, -res.log2_rT)));
    return v;
  }

  // Sweep C (dense): every column as if not kept; the kept ones are rewritten by scatter_kept.
  template <int P, int N>
  SMSKD_HD void gradient(const TopKRowResult& res, T* g_row, int64_t y, int64_t c, int64_t stride) const {
    constexpr int M = P * N;
    float s[M], r[M], out[M];
    load_chunk<P, N>(s_row, c, stride, s);
    if (kRef) load_chunk<P, N>(r_row, c, stride, r);
#pragma unroll
    for (int e = 0; e < M; ++e) {
      const int64_t column = c + (e / N) * stride + (e % N);
      out[e] = gradient_at<kExactRest>(res, s[e], kRef ? r[e] : 0.0f, kTarget && column == y, res.rest_scale, 0.0f);
    }
    store_chunk<P, N>(g_row, c, stride, out);
  }

  // The kept classes' gradient, p~_c = p_c (0 where p_c = 0); after sweep C and a barrier.
  SMSKD_HD void scatter_kept(const TopKRowResult& res, T* g_row, int64_t y, int lane, int threads) const {
    for (int64_t c = lane; c < k; c += threads) {
      const int64_t j = kept_class(c);
      const float p = expf(log_p(c));
      const float r = kRef ? to_float(r_row[j]) : 0.0f;
      g_row[j] = from_float<T>(gradient_at(res, to_float(s_row[j]), r, kTarget && j == y, 0.0f, p != 0.0f ? p : 0.0f));
    }
  }
};

// Writes the per-row outputs (SMSKD_PER_ROW_OUTPUTS).
SMSKD_HD void store_topk_row(const TopKParams& prm, int64_t row, const TopKRowResult& res) {
#define SMSKD_STORE_OUTPUT(name) prm.name[row] = res.name;
  SMSKD_PER_ROW_OUTPUTS(SMSKD_STORE_OUTPUT)
#undef SMSKD_STORE_OUTPUT
}

template <typename T, int kThreads, int kRowsPerBlock, bool kTarget, bool kRef, int kPower, bool kExactRest = false>
__device__ __forceinline__ void process_topk_rows(const TopKParams& prm, const T* __restrict__ student,
                                                  const T* __restrict__ reference, T* __restrict__ grad) {
  using Math = TopKRowMath<T, kTarget, kRef, kPower, kExactRest>;
  constexpr int kWarps = kThreads / 32;
  static_assert(kThreads <= 32 || kRowsPerBlock == 1, "rows of several warps own their block (merge_row_statistics)");
  constexpr int kLanes = kThreads < 32 ? kThreads : 32;
  constexpr int kShared = kWarps > 1 ? kWarps : 1;
  __shared__ TopKRowStats row_maxima[kShared], row_sums[kShared];
  __shared__ KeptStats kept_maxima[kShared], kept_sums[kShared];
  __shared__ StreamStats rest_max_maxima[kShared], rest_max_sums[kShared];  // the exact-rest kernel's merges
  __shared__ RestSum rest_sum_maxima[kShared], rest_sum_sums[kShared];
  const unsigned mask = row_lane_mask<kLanes>();
  const int lane = threadIdx.x % kThreads;
  const int64_t cols = prm.cols;
  const float grad_scale = gradient_scale(prm, grad != nullptr);

  // Every thread of the row passes each barrier: the loop and its branches are uniform per row.
  auto row_barrier = [&] {
    if (kWarps > 1) {
      __syncthreads();
    } else {
      __syncwarp(mask);
    }
  };

  for (int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / kThreads; row < prm.rows;
       row += int64_t{gridDim.x} * kRowsPerBlock) {
    if (kExactRest && !prm.exact_rest[row]) continue;  // the main kernel's row (uniform: a block per row)
    T* g_row = grad ? grad + row * prm.grad_stride : nullptr;
    const RowSweep<T, kThreads> sweep(student + row * prm.student_stride, cols, prm.vectorized, lane);
    int64_t y = 0;
    if (kTarget) {
      y = prm.target[row * prm.target_stride];
      if (y == prm.ignore_index) {  // ignored row: zeros everywhere
        if (lane == 0) {
          store_topk_row(prm, row, TopKRowResult{});
          if (!kExactRest) prm.exact_rest[row] = 0;
        }
        if (g_row) {
          sweep.run(cols, [&](int64_t c, int64_t stride, auto packs, auto n) {
            zero_chunk<decltype(packs)::value, decltype(n)::value>(g_row, c, stride);
          });
        }
        continue;
      }
      if (y < 0 || y >= cols) {
        fail_target_out_of_range();
        if (lane == 0) prm.loss[row] = NAN;  // never reached; no silent value if it were
        continue;
      }
    }
    const Math math(prm, student, reference, row);
    const float s_y = kTarget ? to_float(math.s_row[y]) : 0.0f;

    TopKRowStats st;
    StreamStats rest_max;  // kExactRest: the rest's largest logit
    sweep.run(cols, [&](int64_t c, int64_t stride, auto packs, auto n) {
      math.template accumulate<decltype(packs)::value, decltype(n)::value>(st, rest_max, c, stride);
    });
    // Each merge's two barriers also keep this row's shared entries apart from the next row's.
    merge_row_statistics<kLanes, kWarps, TopKRowStreams<kTarget, kRef>>(st, mask, Math::k1, math.kT, row_maxima,
                                                                        row_sums);
    RestSum rest{st.s.max, st.s.dot};  // R at the row's maximum, or in the exact-rest kernel at the rest's own
    if constexpr (kExactRest) {
      merge_row_statistics<kLanes, kWarps, RestMaxStreams>(rest_max, mask, Math::k1, math.kT, rest_max_maxima,
                                                           rest_max_sums);
      rest = RestSum{rest_max.max == -INFINITY ? st.s.max : rest_max.max, 0.0f};  // a rest of -inf: R = 0 still
      sweep.run(cols, [&](int64_t c, int64_t stride, auto packs, auto n) {
        math.template accumulate_rest<decltype(packs)::value, decltype(n)::value>(rest, c, stride);
      });
      merge_row_statistics<kLanes, kWarps, RestSumStreams>(rest, mask, Math::k1, math.kT, rest_sum_maxima,
                                                           rest_sum_sums);
    }

    KeptStats ks;
    math.gather(ks, st, lane, kThreads);
    merge_row_statistics<kLanes, kWarps, KeptStreams>(ks, mask, Math::k1, math.kT, kept_maxima, kept_sums);

    const TopKRowResult res = math.finish(st, ks, rest, s_y, kTarget ? prm.true_logit[row] : 0.0f,
                                          kTarget ? prm.lse[row] : 0.0f, prm);
    if (lane == 0) {
      store_topk_row(prm, row, res);
      if (!kExactRest) prm.exact_rest[row] = res.exact_rest;
    }
    if (!g_row) continue;
    const TopKRowResult scaled = with_gradient_scale(res, grad_scale);  // the rest's and kept classes' alike
    sweep.run(cols, [&](int64_t c, int64_t stride, auto packs, auto n) {
      math.template gradient<decltype(packs)::value, decltype(n)::value>(scaled, g_row, y, c, stride);
    });
    row_barrier();  // the dense sweep's writes of kept columns land before their rewrite
    math.scatter_kept(scaled, g_row, y, lane, kThreads);
  }
}

// The exact-rest kernel: the rows the main kernel flagged (TopKParams::exact_rest) again, a block of
// kExactRestThreads per row, over a grid of any size; the others are skipped at once.
template <typename T, bool kRef>
__global__ void __launch_bounds__(kExactRestThreads)
    smskd_topk_exact_rest_kernel(TopKParams prm, const T* student, const T* reference, T* grad) {
  if (prm.target != nullptr) {
    process_topk_rows<T, kExactRestThreads, 1, true, kRef, 0, true>(prm, student, reference, grad);
  } else {
    process_topk_rows<T, kExactRestThreads, 1, false, kRef, 0, true>(prm, student, reference, grad);
  }
}

// kPower != 0 (temperature_power): launched only with a target and a temperature of kPower
// (smskd_topk_kernels.cu chooses).
template <typename T, int kThreads, int kRowsPerBlock, bool kRef, int kPower>
__global__ void __launch_bounds__(kThreads* kRowsPerBlock, min_blocks_per_sm(kThreads* kRowsPerBlock))
    smskd_topk_rows_kernel(TopKParams prm, const T* student, const T* reference, T* grad) {
  if constexpr (kPower != 0) {
    process_topk_rows<T, kThreads, kRowsPerBlock, true, kRef, kPower>(prm, student, reference, grad);
  } else if (prm.target != nullptr) {
    process_topk_rows<T, kThreads, kRowsPerBlock, true, kRef, 0>(prm, student, reference, grad);
  } else {
    process_topk_rows<T, kThreads, kRowsPerBlock, false, kRef, 0>(prm, student, reference, grad);
  }
}

}  // namespace kernels
}  // namespace smskd
