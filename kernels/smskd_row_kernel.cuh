// The fused SMSKD row kernel (SPEC.md section 2), templated over the input dtype,
// the threads that share a row, and which of teacher / reference / target exist.
//
// One row is the unit of work: 8 or 16 lanes of a warp per row for the smallest
// C, a warp per row for small C, a block per row for large C. Each thread sweeps its share of the row once, in 16-byte packs when
// the pointers allow, keeping fp32 online-softmax statistics of s, t and r
// (StreamStats); warp shuffles and then shared memory merge them into the row's
// log-sum-exps and KL sums. A second sweep, while the row is still in L1/L2,
// writes d loss / d s in the input dtype, times the launch's grad_scale (folded
// into the row's coefficients: with_gradient_scale). No PyTorch dependency.
#pragma once

#include <assert.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "smskd_kernels.h"

#if defined(NDEBUG)
// glibc declares __assert_fail only without NDEBUG; CUDA implements it on the
// device either way. Same signature as glibc's, so both declarations agree.
extern "C" __host__ __device__ void __assert_fail(const char* assertion, const char* file, unsigned int line,
                                                  const char* function) noexcept __attribute__((__noreturn__));
#endif

namespace smskd {
namespace kernels {

#define SMSKD_HD __host__ __device__ __forceinline__

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kPackBytes = 16;
template <typename T>
constexpr int kPackElements = kPackBytes / sizeof(T);  // elements of T in one 16-byte pack

SMSKD_HD float to_float(float x) { return x; }
SMSKD_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
SMSKD_HD float to_float(__half x) { return __half2float(x); }

template <typename T>
SMSKD_HD T from_float(float x);
template <>
SMSKD_HD float from_float<float>(float x) { return x; }
template <>
SMSKD_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
SMSKD_HD __half from_float<__half>(float x) { return __float2half_rn(x); }

// N consecutive elements moved as one aligned load or store (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
SMSKD_HD void unpack(const Pack<T, N>& pack, float (&out)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(pack.v[k]);
}

template <int N, typename T>
SMSKD_HD void store_pack(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// Softmax statistics of one logits stream x over part of a row, at temperature
// 1 and at T, sharing one running maximum (max(x/T) = max(x)/T since T > 0):
//   sum1 = sum_c exp(x_c - max),  sumT = sum_c exp((x_c - max)/T),
//   dot  = sum_c exp((x_c - max)/T) * d_c  (Dot says what d_c is),
// so lse(x) = max + log(sum1), lse(x/T) = max/T + log(sumT) and
// sum_c softmax(x/T)_c d_c = dot / sumT. Exponentials are exp2 of pre-scaled
// arguments (k1 = log2 e, kT = log2 e / T). Which sums are kept is a template
// choice, so unused ones cost nothing.
struct StreamStats {
  float max = -INFINITY;
  float sum1 = 0.0f;
  float sumT = 0.0f;
  float dot = 0.0f;
};

// What a stream's dot sums. kWeighted: given weights d_c (the top-k rest's indicator). kCross: the
// KL terms' d_c = (x_c - shift(x)) - (s_c - shift(s)) against the student's logits s, each logit
// taken relative to its own row's shift (its running maximum) before the two are subtracted, so that
// the p-weighted difference stays exact where both are far out (x_c - s_c itself rounds to the spacing
// of x_c: a teacher logit of 1e4 cost KD ~1e-3, 1e6 ~0.1). Not yet divided by T: finish() scales
// once per row. A cross dot is re-expressed when either shift moves (follow_student, rescale_cross).
enum class Dot { kNone, kWeighted, kCross };

// max(a, b), NaN where either is NaN; fmaxf returns the other operand instead, so a row holding a NaN and
// a +inf had the maximum +inf, and cross_entropy's guard for a +inf maximum then gave CE +inf where the NaN
// must give NaN. On the device PTX max.NaN.f32 (sm_80 on, SASS FMNMX.NAN: the cost of fmaxf).
SMSKD_HD float max_or_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float m;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(a), "f"(b));
  return m;
#else
  return a > b || a != a ? a : b;
#endif
}

// What a stream's values are taken relative to: its maximum, or 0 while every value so far is
// -inf (their exponentials are then 0, not NaN). A NaN maximum (max_or_nan) gives NaN, which
// poisons every sum of the stream.
SMSKD_HD float shift_of(const StreamStats& st) { return st.max == -INFINITY ? 0.0f : st.max; }

// A cross dot re-expressed for the student's shift moving by `moved` (new minus old): every term's
// s_c - shift(s) falls by moved. Sums of 0 stay 0, even for an infinite move.
SMSKD_HD void follow_student(StreamStats& x, float moved) {
  if (x.sumT != 0.0f && moved != 0.0f) x.dot = fmaf(x.sumT, moved, x.dot);
}

// A cross dot re-expressed at a maximum -drop above the stream's finite one (drop = old - new < 0), its
// terms' exponentials scaled by scale = exp2(drop kT): every x_c - shift(x) falls by -drop. A factor 0
// (an old maximum of -inf, or a new one of +inf) leaves 0, not 0 x inf.
SMSKD_HD float rescale_cross(float dot, float sumT, float drop, float scale) {
  return scale == 0.0f ? 0.0f : fmaf(sumT, drop, dot) * scale;
}

// Temperatures at which exp(z) is a small power of exp(z/T), so that the T = 1 exponentials of a
// stream kept at both temperatures cost a multiply instead of a MUFU op: kPower = T for T = 1
// and T = 2 (the temperatures LLM distillation uses most), 0 for any other T (each exponential
// its own). With a target, teacher and reference that takes the statistics sweep from 5 to 3
// exponentials per element and the gradient sweep from 4 to 3 (docs/perf_notes.md).
SMSKD_HD int temperature_power(float temperature) {
  return temperature == 1.0f ? 1 : temperature == 2.0f ? 2 : 0;
}

// e^kPower for kPower 1 or 2: exp(z) from e = exp(z/T) when T = kPower.
template <int kPower>
SMSKD_HD float to_unit_temperature(float e) {
  static_assert(kPower == 1 || kPower == 2, "only T = 1 and T = 2 share their exponentials");
  return kPower == 1 ? e : e * e;
}

// With kPower != 0, once per row: unit_root = 2^(log2 sumT - log2 sum1 / kPower) (log2_sT, log2_s:
// the logs of the student's sums at T and at 1), so that softmax(s)_c = (softmax(s/T)_c unit_root)^kPower.
// The root rather than its power: the square of q unit_root underflows only where softmax(s) does.
template <int kPower>
SMSKD_HD float unit_temperature_root(float log2_sT, float log2_s) {
  if constexpr (kPower != 0) return exp2f(log2_sT - log2_s * (1.0f / kPower));
  return 0.0f;
}

// softmax(s)_c from q = softmax(s/T)_c by a multiply or two when kPower != 0 (unit_root:
// unit_temperature_root), else by its own exponential of zs = s_c - max_s (k1 = log2 e).
template <int kPower>
SMSKD_HD float unit_softmax(float q, float zs, float k1, float log2_s, float unit_root) {
  if constexpr (kPower != 0) return to_unit_temperature<kPower>(q * unit_root);
  return exp2f(fmaf(zs, k1, -log2_s));
}

// kPower (temperature_power): sum1's exponentials are taken from sumT's when nonzero. d: the
// weights for Dot::kWeighted; for Dot::kCross the student's s_c - shift(s), at the student's shift
// that st's dot follows (follow_student first when it moved).
template <bool kSum1, bool kSumT, Dot kDot, int kPower = 0, int N>
SMSKD_HD void add_values(StreamStats& st, const float (&x)[N], const float (&d)[N], float k1,
                                           float kT) {
  constexpr bool kHasDot = kDot != Dot::kNone;
  constexpr bool kSoftened = kSumT || kHasDot || (kSum1 && kPower != 0);  // exponentials at T taken
  float m = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) m = max_or_nan(m, x[k]);
  if (!(m <= st.max)) {  // rescale once per chunk, only when the maximum grows or meets a NaN
    const float grown = max_or_nan(st.max, m);  // once NaN, NaN for the rest of the row
    const float shift = st.max - grown;  // -inf while empty: the factors are then 0
    const float scale = exp2f(shift * kT);
    if constexpr (kSum1 && kPower != 0) st.sum1 *= to_unit_temperature<kPower>(scale);
    if constexpr (kSum1 && kPower == 0) st.sum1 *= exp2f(shift * k1);
    if constexpr (kDot == Dot::kCross) st.dot = rescale_cross(st.dot, st.sumT, shift, scale);
    if constexpr (kDot == Dot::kWeighted) st.dot *= scale;
    if (kSumT) st.sumT *= scale;
    st.max = grown;
  }
  // A chunk of only -inf (probability 0) leaves max at -inf: measure from 0 so that -inf adds 0.
  // A NaN makes max NaN (max_or_nan), and so every sum of the stream.
  const float base = shift_of(st);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float z = x[k] - base;
    const float e = kSoftened ? exp2f(z * kT) : 0.0f;
    if constexpr (kSum1 && kPower != 0) st.sum1 += to_unit_temperature<kPower>(e);
    if constexpr (kSum1 && kPower == 0) st.sum1 += exp2f(z * k1);
    if (kSumT) st.sumT += e;
    // p = 0 adds 0 even where the difference is infinite
    if constexpr (kDot == Dot::kCross) st.dot += e > 0.0f ? e * (z - d[k]) : 0.0f;
    if constexpr (kDot == Dot::kWeighted) st.dot += e > 0.0f ? e * d[k] : 0.0f;
  }
}

// After the student's chunk s was added to its statistics (its shift then: shift_before): s relative to
// the student's shift in zs, what add_values<..., Dot::kCross> takes as d, and how far that shift moved,
// what the cross dots follow first (follow_student).
template <int N>
SMSKD_HD float relative_to_student(const StreamStats& student, float shift_before, const float (&s)[N],
                                   float (&zs)[N]) {
  const float base = shift_of(student);
#pragma unroll
  for (int k = 0; k < N; ++k) zs[k] = s[k] - base;
  return base - shift_before;
}

// The lanes of the calling thread's warp that work on its row.
template <int kLanes>
__device__ __forceinline__ unsigned row_lane_mask() {
  if constexpr (kLanes >= 32) {
    return 0xffffffffu;
  } else {
    const int first = (threadIdx.x % 32) / kLanes * kLanes;
    return ((1u << kLanes) - 1u) << first;
  }
}

// Which statistics each stream needs, given which inputs exist.
template <bool kTarget, bool kTeacher, bool kRef>
struct Needs {
  static constexpr bool kSoftened = kTeacher || kRef;  // anything at temperature T
  // student: lse(s) for CE, lse(s/T) for both KL terms
  static constexpr bool kStudent1 = kTarget, kStudentT = kSoftened;
  // teacher: lse(t) for TCP, lse(t/T) and the p_t-weighted cross dot for KD (Dot::kCross)
  static constexpr bool kTeacher1 = kTeacher && kTarget;
};

// Row-level statistics of the three streams, merged across every thread of the row.
struct RowStats {
  StreamStats s, t, r;
};

// The row's statistics from its threads' in two steps, so that merging costs no exponential per
// step: the streams' maxima first (max-reduced over the row's threads), then each thread's sums
// rescaled once to them (at most 5 exp2 per thread and row) and added. Merging (max, sums) pairs
// instead took 10 exp2 per butterfly step and per warp merged: ~210 per thread and row with 512
// threads per row, ~3.3 per element at C = 32000 on top of the sweeps' 9.3 (docs/perf_notes.md).
// Written once for every statistics type (RowStats here, the top-k form's two): a type's Streams
// lists its StreamStats with the sums each keeps, and its plain sums (added as they are).

// Which sums of a StreamStats a merge carries.
template <bool Sum1, bool SumT, Dot D>
struct Sums {
  static constexpr bool kSum1 = Sum1, kSumT = SumT, kDot = D != Dot::kNone;
  static constexpr Dot kDotKind = D;
};

// The statistics types without cross dots: nothing follows the student's shift in their merges.
struct WithoutCrossDots {
  template <typename Stats>
  SMSKD_HD static void follow_student(Stats&, const Stats&) {}
};

// RowStats' streams given which inputs exist: f(a.x, b.x, Sums) per present stream. follow_student:
// before a thread's sums are rescaled to the row's maxima (row), its cross dots follow the student's shift
// from the thread's to the row's.
template <bool kTarget, bool kTeacher, bool kRef>
struct RowStreams {
  using N = Needs<kTarget, kTeacher, kRef>;
#pragma nv_exec_check_disable
  template <typename A, typename B, typename F>
  SMSKD_HD static void each(A& a, B& b, F&& f) {
    f(a.s, b.s, Sums<N::kStudent1, N::kStudentT, Dot::kNone>{});
    if constexpr (kTeacher) f(a.t, b.t, Sums<N::kTeacher1, true, Dot::kCross>{});
    if constexpr (kRef) f(a.r, b.r, Sums<false, true, Dot::kCross>{});
  }
  template <typename A, typename B, typename F>
  SMSKD_HD static void each_plain(A&, B&, F&&) {}
  template <typename Stats>
  SMSKD_HD static void follow_student(Stats& st, const Stats& row) {
    const float moved = shift_of(row.s) - shift_of(st.s);
    if constexpr (kTeacher) kernels::follow_student(st.t, moved);
    if constexpr (kRef) kernels::follow_student(st.r, moved);
  }
};

// a's maxima become the maxima of a's and b's.
template <typename Streams, typename Stats>
SMSKD_HD void max_of_maxima(Stats& a, const Stats& b) {
  Streams::each(a, b, [](StreamStats& x, const StreamStats& y, auto) { x.max = max_or_nan(x.max, y.max); });
}

// One stream's sums rescaled from its own maximum to m >= it (equal maxima, even both -inf,
// scale by 1; an empty share's -inf maximum scales its zero sums by 0).
template <bool kSum1, bool kSumT, Dot kDot>
SMSKD_HD void rescale_stream(StreamStats& x, float m, float k1, float kT) {
  const float shift = x.max == m ? 0.0f : x.max - m;
  if (kSum1) x.sum1 *= exp2f(shift * k1);
  if (kSumT || kDot != Dot::kNone) {
    const float scale = exp2f(shift * kT);
    if constexpr (kDot == Dot::kCross) x.dot = rescale_cross(x.dot, x.sumT, shift, scale);
    if constexpr (kDot == Dot::kWeighted) x.dot *= scale;
    if (kSumT) x.sumT *= scale;
  }
  x.max = m;
}

// A thread's sums rescaled to the row's maxima (the maxima of row_max), its cross dots first
// following the student's shift to the row's (Streams::follow_student).
template <typename Streams, typename Stats>
SMSKD_HD void rescale_to_maxima(Stats& st, const Stats& row_max, float k1, float kT) {
  Streams::follow_student(st, row_max);
  Streams::each(st, row_max, [&](StreamStats& x, const StreamStats& m, auto sums) {
    using S = decltype(sums);
    rescale_stream<S::kSum1, S::kSumT, S::kDotKind>(x, m.max, k1, kT);
  });
}

// a's sums plus b's, both at the same maxima.
template <typename Streams, typename Stats>
SMSKD_HD void add_sums(Stats& a, const Stats& b) {
  Streams::each(a, b, [](StreamStats& x, const StreamStats& y, auto sums) {
    using S = decltype(sums);
    if (S::kSum1) x.sum1 += y.sum1;
    if (S::kSumT) x.sumT += y.sumT;
    if (S::kDot) x.dot += y.dot;
  });
  Streams::each_plain(a, b, [](float& x, const float& y) { x += y; });
}

// st's maxima (kMaxima) or the sums that add_sums adds, from the lane at xor offset.
template <typename Streams, bool kMaxima, typename Stats>
__device__ __forceinline__ Stats shuffled(const Stats& st, unsigned mask, int offset) {
  Stats other;
  Streams::each(other, st, [&](StreamStats& x, const StreamStats& y, auto sums) {
    using S = decltype(sums);
    if (kMaxima) x.max = __shfl_xor_sync(mask, y.max, offset);
    if (!kMaxima && S::kSum1) x.sum1 = __shfl_xor_sync(mask, y.sum1, offset);
    if (!kMaxima && S::kSumT) x.sumT = __shfl_xor_sync(mask, y.sumT, offset);
    if (!kMaxima && S::kDot) x.dot = __shfl_xor_sync(mask, y.dot, offset);
  });
  if (!kMaxima) Streams::each_plain(other, st, [&](float& x, const float& y) { x = __shfl_xor_sync(mask, y, offset); });
  return other;
}

// Combines a per-thread value v over the row's threads into every one of them: xor shuffles
// (shuffle(v, offset): the lane's partner's value) within the warp, then, for rows of several warps,
// the warps' values through shared (kWarps entries) after one barrier, in warp order.
template <int kLanes, int kWarps, typename Stats, typename Shuffle, typename Combine>
__device__ __forceinline__ void reduce_over_row(Stats& v, Shuffle&& shuffle, Combine&& combine, Stats* shared) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) combine(v, shuffle(v, offset));
  if constexpr (kWarps > 1) {  // several warps: the row owns its block (kRowsPerBlock = 1)
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
    __syncthreads();
    v = shared[0];
#pragma unroll 4
    for (int w = 1; w < kWarps; ++w) combine(v, shared[w]);
  }
}

// Merges the statistics of the kThreads threads of a row (kLanes of them per warp, kWarps warps)
// into every one of them, identically (the same additions in the same order in every thread, so
// that each computes the same row results). shared_maxima, shared_sums: kWarps entries each of the
// block's shared memory; its two barriers keep rows apart (a thread writes the next row's maxima
// only after every thread has passed this row's second barrier, i.e. read this row's maxima, and
// the next row's sums only after every thread has read this row's).
template <int kLanes, int kWarps, typename Streams, typename Stats>
__device__ __forceinline__ void merge_row_statistics(Stats& st, unsigned mask, float k1, float kT,
                                                     Stats* shared_maxima, Stats* shared_sums) {
  Stats row = st;  // the row's maxima
  reduce_over_row<kLanes, kWarps>(
      row, [&](const Stats& v, int offset) { return shuffled<Streams, true>(v, mask, offset); },
      [](Stats& a, const Stats& b) { max_of_maxima<Streams>(a, b); }, shared_maxima);
  rescale_to_maxima<Streams>(st, row, k1, kT);
  reduce_over_row<kLanes, kWarps>(
      st, [&](const Stats& v, int offset) { return shuffled<Streams, false>(v, mask, offset); },
      [](Stats& a, const Stats& b) { add_sums<Streams>(a, b); }, shared_sums);
}

// Scalars of one launch, copied from smskd_loss_rows_args into kernel parameters.
struct Params {
  int64_t rows, cols;
  int64_t student_stride, teacher_stride, reference_stride, target_stride, grad_stride;
  const float* grad_scale;  // NULL: 1 (smskd_loss_rows_args.grad_scale)
  const int64_t* target;
  SMSKD_PER_ROW_OUTPUTS(SMSKD_PER_ROW_OUTPUT_POINTER)
  float temperature, ce_weight, kd_weight, ref_weight;
  smskd_weighting weighting;
  int64_t ignore_index;
  bool vectorized;  // every row of every tensor starts at the same offset modulo 16 bytes
  // Packs of each stream a block-per-row layout keeps in dynamic shared memory between the sweeps
  // (RowCache; 0: none, always on the scalar path). The launch gives the block row_cache_packs x
  // streams x 16 bytes of it.
  int64_t row_cache_packs;
};

// Column ranges of one row as seen by one thread: a scalar head up to the
// first 16-byte boundary of the student row, packs of kVec, a scalar tail.
template <typename T, int kThreads>
struct RowSweep {
  static constexpr int kVec = kPackElements<T>;
  static constexpr int kUnroll = 2;  // packs in flight per stream and thread
  int64_t head, packs, tail_begin;
  int lane;

  SMSKD_HD RowSweep(const T* row, int64_t cols, bool vectorized, int lane_) : lane(lane_) {
    const int misaligned = static_cast<int>((reinterpret_cast<uintptr_t>(row) % kPackBytes) / sizeof(T));
    head = vectorized ? (misaligned ? kVec - misaligned : 0) : cols;
    head = head < cols ? head : cols;
    packs = (cols - head) / kVec;
    tail_begin = head + packs * kVec;
  }

  // Calls visit(column, stride, Packs, N) on chunks of Packs x N elements:
  // pack p covers columns [column + p*stride, column + p*stride + N).
#pragma nv_exec_check_disable
  template <typename Visit>
  SMSKD_HD void run(int64_t cols, Visit&& visit) const {
    run_packs<false>(cols, 0, visit);
  }

  // As run, calling visit(column, stride, Packs, N, Kept, pack) where pack is the row's index of the
  // chunk's first 16-byte pack (its second is pack + kThreads) and Kept (std::true_type or
  // std::false_type) says whether the chunk's packs are among the row's first `kept` (a row cache's).
  // A pair of packs is never split: with kept a multiple of kUnroll * kThreads (or >= packs) every
  // pack below it is visited as kept; otherwise the pair that straddles it is not, in every sweep alike.
#pragma nv_exec_check_disable
  template <typename Visit>
  SMSKD_HD void run_kept(int64_t cols, int64_t kept, Visit&& visit) const {
    run_packs<true>(cols, kept, visit);
  }

 private:
  // visit's call for run (kKeeps false: without Kept and pack) or run_kept.
#pragma nv_exec_check_disable
  template <bool kKeeps, typename Visit, typename Packs, typename N, typename Kept>
  static SMSKD_HD void call(Visit& visit, int64_t column, int64_t stride, Packs packs, N n, Kept kept, int64_t pack) {
    if constexpr (kKeeps) {
      visit(column, stride, packs, n, kept, pack);
    } else {
      visit(column, stride, packs, n);
    }
  }

#pragma nv_exec_check_disable
  template <bool kKeeps, typename Visit>
  SMSKD_HD void run_packs(int64_t cols, int64_t kept, Visit& visit) const {
    using One = std::integral_constant<int, 1>;
    using Vec = std::integral_constant<int, kVec>;
    using Two = std::integral_constant<int, kUnroll>;
    using Kept = std::true_type;
    using NotKept = std::false_type;
    for (int64_t c = lane; c < head; c += kThreads) call<kKeeps>(visit, c, 0, One{}, One{}, NotKept{}, -1);
    int64_t p = lane;
    if constexpr (kKeeps) {
      const int64_t kept_end = kept < packs ? kept : packs;
      for (; p + (kUnroll - 1) * kThreads < kept_end; p += kUnroll * kThreads)
        call<kKeeps>(visit, head + p * kVec, int64_t{kThreads} * kVec, Two{}, Vec{}, Kept{}, p);
      for (; p < kept_end && p + (kUnroll - 1) * kThreads >= packs; p += kThreads)  // a last single pack, kept
        call<kKeeps>(visit, head + p * kVec, 0, One{}, Vec{}, Kept{}, p);
    }
    for (; p + (kUnroll - 1) * kThreads < packs; p += kUnroll * kThreads)
      call<kKeeps>(visit, head + p * kVec, int64_t{kThreads} * kVec, Two{}, Vec{}, NotKept{}, p);
    for (; p < packs; p += kThreads) call<kKeeps>(visit, head + p * kVec, 0, One{}, Vec{}, NotKept{}, p);
    for (int64_t c = tail_begin + lane; c < cols; c += kThreads)
      call<kKeeps>(visit, c, 0, One{}, One{}, NotKept{}, -1);
  }
};

// Sweep 1's 16-byte packs of one row kept on chip for sweep 2, so that sweep 2 does not read them
// again from global memory (docs/perf_notes.md, prediction 4): the row's first `packs` packs of each
// stream (RowSweep::run_kept), in shared memory on the device. Each thread stores and reloads only
// the packs it visits itself (both sweeps visit the same packs in each lane), so the slots need no
// barrier. packs = 0 keeps nothing.
template <typename T>
struct RowCache {
  using Slot = Pack<T, kPackElements<T>>;
  Slot* slots = nullptr;  // [stream][pack]: the present streams in order student, teacher, reference
  int64_t packs = 0;

  SMSKD_HD Slot* slot(int stream, int64_t pack) const { return slots + stream * packs + pack; }
};

// P packs of N elements of a row (pack p at column + p * stride) as floats, each one load. kKeep
// (sweep 1) also stores them in their slots of cache, of which pack is the row's index of the
// chunk's first pack (RowSweep::run_kept).
template <int P, int N, bool kKeep = false, typename T>
SMSKD_HD void load_chunk(const T* row, int64_t column, int64_t stride, float (&out)[P * N],
                         const RowCache<T>& cache = {}, int stream = 0, int64_t pack = 0) {
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const Pack<T, N> loaded = *reinterpret_cast<const Pack<T, N>*>(row + column + p * stride);
    if constexpr (kKeep) *cache.slot(stream, pack + p * stride / N) = loaded;
    float part[N];
    unpack<N>(loaded, part);
#pragma unroll
    for (int k = 0; k < N; ++k) out[p * N + k] = part[k];
  }
}

// load_chunk that reads the chunk's packs from their cache slots when kKept (sweep 2).
template <int P, int N, bool kKept, typename T>
SMSKD_HD void load_chunk_kept(const T* row, int64_t column, int64_t stride, float (&out)[P * N],
                              const RowCache<T>& cache, int stream, int64_t pack) {
  if constexpr (kKept) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const Pack<T, N> kept = *cache.slot(stream, pack + p * stride / N);  // one 16-byte load of the slot
      float part[N];
      unpack<N>(kept, part);
#pragma unroll
      for (int k = 0; k < N; ++k) out[p * N + k] = part[k];
    }
  } else {
    load_chunk<P, N>(row, column, stride, out);
  }
}

template <int P, int N, typename T>
SMSKD_HD void store_chunk(T* row, int64_t column, int64_t stride, const float (&in)[P * N]) {
#pragma unroll
  for (int p = 0; p < P; ++p) {
    float part[N];
#pragma unroll
    for (int k = 0; k < N; ++k) part[k] = in[p * N + k];
    store_pack<N>(row + column + p * stride, part);
  }
}

template <int P, int N, typename T>
SMSKD_HD void zero_chunk(T* row, int64_t column, int64_t stride) {
  const float zeros[P * N] = {};
  store_chunk<P, N>(row, column, stride, zeros);
}

// Trips a device-side assertion whatever NDEBUG says (as c10's CUDA_KERNEL_ASSERT).
__device__ __forceinline__ void fail_target_out_of_range() {
  __assert_fail("smskd: target out of range [0, C) and not ignore_index", __FILE__, __LINE__, __func__);
}

constexpr float kLn2 = 0.6931471805599453f;

// -log softmax(s)_y = (max_s - s_y) + ln(sum1) from log2_s = log2(sum1). A +inf logit makes sum1 NaN
// (inf - inf in an exponent): CE is then +inf, or NaN with the +inf at the target, as PyTorch's.
SMSKD_HD float cross_entropy(float max_s, float s_y, float log2_s) {
  return max_s == INFINITY ? max_s - s_y : (max_s - s_y) + log2_s * kLn2;
}

// Per-row outputs, and what the gradient needs: its coefficients, each stream's maximum and
// the log2 of its sums, so that softmax(x/T)_c = exp2((x_c - max) * kT - log2(sumT)).
struct RowResult {
#define SMSKD_RESULT_FIELD(name) float name = 0.0f;
  SMSKD_PER_ROW_OUTPUTS(SMSKD_RESULT_FIELD)  // the per-row outputs
#undef SMSKD_RESULT_FIELD
  float a = 0.0f, b = 0.0f, g = 0.0f;  // CE, KD and reference coefficients of the gradient
  float max_s = 0.0f, max_t = 0.0f, max_r = 0.0f;
  float log2_s = 0.0f, log2_sT = 0.0f, log2_tT = 0.0f, log2_rT = 0.0f;  // log2 of sum1 / sumT
  float unit_root = 0.0f;  // RowMath's kPower != 0: unit_temperature_root, for unit_softmax
};

// The gradient's factor (the launch's grad_scale; NULL: 1), read from device memory once per
// thread and only when a gradient is written: no host synchronisation.
template <typename KernelParams>
SMSKD_HD float gradient_scale(const KernelParams& prm, bool writes_grad) {
  return writes_grad && prm.grad_scale != nullptr ? *prm.grad_scale : 1.0f;
}

// A row's result (RowResult, TopKRowResult) with the gradient's factor folded into its
// gradient coefficients a, b and g, once per row: the gradient sweep then writes
// scale * d loss / d s at no cost per element, a coefficient times (q - q) = 0 stays exactly 0
// (C = 1), and scale 1 leaves every bit as it was. The per-row outputs are not scaled.
template <typename Result>
SMSKD_HD Result with_gradient_scale(Result res, float scale) {
  res.a *= scale;
  res.b *= scale;
  res.g *= scale;
  return res;
}

// The arithmetic of one row, independent of how threads share it: what a
// thread adds to the statistics for a chunk of columns, the row's results from
// the merged statistics, and the gradient of a chunk. Host and device code, so
// that tests/test_row_math_host.cu checks it on a machine without a GPU. kPower: the launch's
// temperature_power, for rows with a target and a teacher or reference (only they take
// exponentials at both temperatures); 0 for any temperature.
template <typename T, bool kTarget, bool kTeacher, bool kRef, int kPower = 0>
struct RowMath {
  using Need = Needs<kTarget, kTeacher, kRef>;
  static_assert(kPower == 0 || (kTarget && Need::kSoftened), "kPower needs a target and a teacher or reference");
  const T* s_row;
  const T* t_row;
  const T* r_row;
  float temperature, invT, kT;
  static constexpr float k1 = kLog2e;
  // Each present stream's slots in a RowCache: student, teacher, reference in order.
  static constexpr int kStreams = 1 + int{kTeacher} + int{kRef};
  static constexpr int kTeacherSlot = 1, kRefSlot = kTeacher ? 2 : 1;

  SMSKD_HD RowMath(const T* s, const T* t, const T* r, float temperature_)
      : s_row(s), t_row(t), r_row(r), temperature(temperature_), invT(1.0f / temperature_), kT(kLog2e / temperature_) {}

  // Sweep 1: P packs of N columns, pack p starting at column c + p * stride; kKeep: kept in
  // cache for sweep 2 (pack: the row's index of the first, RowSweep::run_kept).
  template <int P, int N, bool kKeep = false>
  SMSKD_HD void accumulate(RowStats& st, int64_t c, int64_t stride, const RowCache<T>& cache = {},
                           int64_t pack = 0) const {
    constexpr int M = P * N;
    float s[M], t[M], r[M], zs[M];
    load_chunk<P, N, kKeep>(s_row, c, stride, s, cache, 0, pack);
    if (kTeacher) load_chunk<P, N, kKeep>(t_row, c, stride, t, cache, kTeacherSlot, pack);
    if (kRef) load_chunk<P, N, kKeep>(r_row, c, stride, r, cache, kRefSlot, pack);
    const float student_shift = shift_of(st.s);
    add_values<Need::kStudent1, Need::kStudentT, Dot::kNone, kPower>(st.s, s, s, k1, kT);
    if constexpr (!Need::kSoftened) return;
    // The KL terms' cross dots, at the student's shift after this chunk (Dot::kCross).
    const float moved = relative_to_student(st.s, student_shift, s, zs);
    if (kTeacher) {
      follow_student(st.t, moved);
      add_values<Need::kTeacher1, true, Dot::kCross, kPower>(st.t, t, zs, k1, kT);
    }
    if (kRef) {
      follow_student(st.r, moved);
      add_values<false, true, Dot::kCross>(st.r, r, zs, k1, kT);
    }
  }

  // SPEC.md section 2 from the row's statistics and its true-class logits. Every term is
  // written relative to the streams' maxima, lse(x/T) = max/T + log(sumT), and differences of
  // maxima are formed before any scaling: the rounding then scales with |x - max| (not |x|),
  // and a row with one class (sums exactly 1, logits equal to their maxima) gives exactly 0
  // for every term and for the gradient, as softmax = 1 does in exact arithmetic. The KL
  // terms' sum_c p_c ((x_c - max_x) - (s_c - max_s)) is the cross dot over sumT (Dot::kCross):
  // with one class exactly 0, whatever nvcc fuses into an FFMA.
  SMSKD_HD RowResult finish(const RowStats& st, float s_y, float t_y, const Params& prm) const {
    RowResult res;
    const float T2 = temperature * temperature;
    res.max_s = st.s.max;
    res.max_t = kTeacher ? st.t.max : 0.0f;
    res.max_r = kRef ? st.r.max : 0.0f;
    res.log2_s = kTarget ? log2f(st.s.sum1) : 0.0f;
    res.log2_sT = Need::kSoftened ? log2f(st.s.sumT) : 0.0f;
    res.log2_tT = kTeacher ? log2f(st.t.sumT) : 0.0f;
    res.log2_rT = kRef ? log2f(st.r.sumT) : 0.0f;
    res.ce = kTarget ? cross_entropy(res.max_s, s_y, res.log2_s) : 0.0f;
    res.unit_root = unit_temperature_root<kPower>(res.log2_sT, res.log2_s);
    res.tcp = Need::kTeacher1 ? exp2f(fmaf(t_y - res.max_t, k1, -log2f(st.t.sum1))) : 0.0f;
    // KL(p||q) = [sum_c p_c ((x_c - max_x) - (s_c - max_s))] / T + log(sumT_s) - log(sumT_x), the sum
    // being dot / sumT
    res.kd = kTeacher ? T2 * ((st.t.dot / st.t.sumT) * invT + (res.log2_sT - res.log2_tT) * kLn2) : 0.0f;
    if (prm.weighting == SMSKD_WEIGHT_CONSTANT) {
      res.weight = 1.0f;
    } else if (Need::kTeacher1) {
      res.weight = prm.weighting == SMSKD_WEIGHT_TCP ? res.tcp : 1.0f - res.tcp;
    }
    res.ref = kRef ? T2 * res.weight * ((st.r.dot / st.r.sumT) * invT + (res.log2_sT - res.log2_rT) * kLn2) : 0.0f;
    res.loss = prm.ce_weight * res.ce + prm.kd_weight * res.kd + prm.ref_weight * res.ref;
    res.a = kTarget ? prm.ce_weight : 0.0f;
    res.b = kTeacher ? temperature * prm.kd_weight : 0.0f;
    res.g = kRef ? temperature * prm.ref_weight * res.weight : 0.0f;
    return res;
  }

  // Sweep 2: d loss / d s = a (softmax(s) - onehot(y)) + b (softmax(s/T) - softmax(t/T))
  //                         + g (softmax(s/T) - softmax(r/T)),
  // kKept: the packs are read from cache, where sweep 1 kept them.
  template <int P, int N, bool kKept = false>
  SMSKD_HD void gradient(const RowResult& res, T* g_row, int64_t y, int64_t c, int64_t stride,
                         const RowCache<T>& cache = {}, int64_t pack = 0) const {
    constexpr int M = P * N;
    float s[M], t[M], r[M], out[M];
    load_chunk_kept<P, N, kKept>(s_row, c, stride, s, cache, 0, pack);
    if (kTeacher) load_chunk_kept<P, N, kKept>(t_row, c, stride, t, cache, kTeacherSlot, pack);
    if (kRef) load_chunk_kept<P, N, kKept>(r_row, c, stride, r, cache, kRefSlot, pack);
#pragma unroll
    for (int k = 0; k < M; ++k) {
      const float zs = s[k] - res.max_s;
      const float q = Need::kSoftened ? exp2f(fmaf(zs, kT, -res.log2_sT)) : 0.0f;  // softmax(s/T)_c
      float v = 0.0f;
      if (kTarget) {
        const int64_t column = c + (k / N) * stride + (k % N);
        const float p = unit_softmax<kPower>(q, zs, k1, res.log2_s, res.unit_root);  // softmax(s)_c
        v = res.a * (p - (column == y ? 1.0f : 0.0f));
      }
      if (kTeacher) v += res.b * (q - exp2f(fmaf(t[k] - res.max_t, kT, -res.log2_tT)));
      if (kRef) v += res.g * (q - exp2f(fmaf(r[k] - res.max_r, kT, -res.log2_rT)));
      out[k] = v;
    }
    store_chunk<P, N>(g_row, c, stride, out);
  }
};

template <typename T, int kThreads, int kRowsPerBlock, bool kTarget, bool kTeacher, bool kRef, int kPower>
__device__ __forceinline__ void process_rows(const Params& prm, const T* student_base,
                                             const T* __restrict__ teacher_base, const T* __restrict__ ref_base,
                                             T* grad_base) {
  using Math = RowMath<T, kTarget, kTeacher, kRef, kPower>;
  constexpr int kWarps = kThreads / 32;
  static_assert(kThreads <= 32 || kRowsPerBlock == 1, "rows of several warps own their block (merge_row_statistics)");
  constexpr int kLanes = kThreads < 32 ? kThreads : 32;  // lanes of one row within a warp
  __shared__ RowStats warp_maxima[kWarps > 1 ? kWarps : 1], warp_sums[kWarps > 1 ? kWarps : 1];
  const unsigned mask = row_lane_mask<kLanes>();

  const int lane = threadIdx.x % kThreads;
  const int64_t cols = prm.cols;
  const float grad_scale = gradient_scale(prm, grad_base != nullptr);
  // A block per row may keep the row's packs on chip (Params::row_cache_packs, in the launch's dynamic
  // shared memory); rows that share a block never do.
  extern __shared__ __align__(16) unsigned char row_cache_memory[];
  RowCache<T> cache;
  if constexpr (kRowsPerBlock == 1) {
    cache.slots = reinterpret_cast<typename RowCache<T>::Slot*>(row_cache_memory);
    cache.packs = prm.row_cache_packs;
  }

  for (int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / kThreads; row < prm.rows;
       row += int64_t{gridDim.x} * kRowsPerBlock) {
    // Student reads go through the generic path, not __ldg: grad may alias them.
    const Math math(student_base + row * prm.student_stride, kTeacher ? teacher_base + row * prm.teacher_stride : nullptr,
                    kRef ? ref_base + row * prm.reference_stride : nullptr, prm.temperature);
    T* g_row = grad_base ? grad_base + row * prm.grad_stride : nullptr;
    const RowSweep<T, kThreads> sweep(math.s_row, cols, prm.vectorized, lane);

    int64_t y = 0;
    bool valid = true;
    if (kTarget) {
      y = prm.target[row * prm.target_stride];
      valid = y != prm.ignore_index;
      if (valid && (y < 0 || y >= cols)) {
        fail_target_out_of_range();
        if (lane == 0) prm.loss[row] = NAN;  // never reached; no silent value if it were
        continue;
      }
    }

    if (!valid) {  // ignored row: zeros everywhere, its logits are never read
      if (lane == 0) {
#define SMSKD_ZERO_OUTPUT(name) prm.name[row] =
        SMSKD_PER_ROW_OUTPUTS(SMSKD_ZERO_OUTPUT) 0.0f;  // prm.loss[row] = prm.ce[row] = ... = 0.0f
#undef SMSKD_ZERO_OUTPUT
      }
      if (g_row) {
        sweep.run(cols, [&](int64_t c, int64_t stride, auto packs, auto n) {
          zero_chunk<decltype(packs)::value, decltype(n)::value>(g_row, c, stride);
        });
      }
      continue;
    }

    // The true-class logits are read before the row's barrier: with an in-place
    // gradient, sweep 2 of another thread may overwrite s[y] after it.
    const float s_y = kTarget ? to_float(math.s_row[y]) : 0.0f;
    const float t_y = Math::Need::kTeacher1 ? to_float(math.t_row[y]) : 0.0f;

    RowStats st;
    sweep.run_kept(cols, cache.packs, [&](int64_t c, int64_t stride, auto packs, auto n, auto kept, int64_t pack) {
      math.template accumulate<decltype(packs)::value, decltype(n)::value, decltype(kept)::value>(st, c, stride,
                                                                                                 cache, pack);
    });

    merge_row_statistics<kLanes, kWarps, RowStreams<kTarget, kTeacher, kRef>>(st, mask, Math::k1, math.kT,
                                                                             warp_maxima, warp_sums);
    // Orders every lane's reads of s before any lane's writes of grad (several warps: the merge's barriers).
    if (kWarps <= 1) __syncwarp(mask);

    // Every thread of the row computes the results; lane 0 stores them.
    const RowResult res = math.finish(st, s_y, t_y, prm);
    if (lane == 0) {
#define SMSKD_STORE_OUTPUT(name) prm.name[row] = res.name;
      SMSKD_PER_ROW_OUTPUTS(SMSKD_STORE_OUTPUT)
#undef SMSKD_STORE_OUTPUT
    }
    if (!g_row) continue;
    const RowResult scaled = with_gradient_scale(res, grad_scale);
    sweep.run_kept(cols, cache.packs, [&](int64_t c, int64_t stride, auto packs, auto n, auto kept, int64_t pack) {
      math.template gradient<decltype(packs)::value, decltype(n)::value, decltype(kept)::value>(scaled, g_row, y, c,
                                                                                                stride, cache, pack);
    });
  }
}

// At least 512 resident threads (16 warps) per SM, i.e. at most 128 registers
// per thread: enough loads in flight for bandwidth without spilling.
constexpr int min_blocks_per_sm(int block_threads) { return block_threads >= 512 ? 1 : 512 / block_threads; }

// kPower != 0 (temperature_power): launched only with a target and a temperature of kPower, the
// rows whose T = 1 exponentials it derives from those at T (smskd_kernels.cu chooses).
template <typename T, int kThreads, int kRowsPerBlock, bool kTeacher, bool kRef, int kPower>
__global__ void __launch_bounds__(kThreads* kRowsPerBlock, min_blocks_per_sm(kThreads* kRowsPerBlock))
    smskd_rows_kernel(Params prm, const T* student, const T* teacher, const T* reference, T* grad) {
  if constexpr (kPower != 0) {
    process_rows<T, kThreads, kRowsPerBlock, true, kTeacher, kRef, kPower>(prm, student, teacher, reference, grad);
  } else if (prm.target != nullptr) {
    process_rows<T, kThreads, kRowsPerBlock, true, kTeacher, kRef, 0>(prm, student, teacher, reference, grad);
  } else {
    process_rows<T, kThreads, kRowsPerBlock, false, kTeacher, kRef, 0>(prm, student, teacher, reference, grad);
  }
}

}  // namespace kernels
}  // namespace smskd
