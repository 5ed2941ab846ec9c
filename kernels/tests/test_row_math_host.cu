// Host-side test of the row kernel's arithmetic, runnable without a GPU.
//
// The kernel's per-thread work (RowSweep: which columns a thread visits, in
// which packs; RowMath: statistics, row results, gradient) is host/device code.
// Here each thread of a row is run in turn on the CPU, their statistics are
// merged as the warp shuffles and shared memory would, and the results are
// compared with the float64 oracle. Also checked: every column is visited
// exactly once per sweep, and every pack of more than one element is 16-byte
// aligned. Warp shuffles, barriers and the launch itself need a GPU
// (test_smskd_kernels.cu). Rows with one NaN or +-inf logit give CE, TCP and KD as PyTorch does
// (check_non_finite_rows). Each row's gradient is also written with a grad_scale folded into
// its coefficients (with_gradient_scale, as the kernel does): it must be scale times the oracle's
// gradient, bit for bit scale times the unscaled one for a power of two, and a launch without
// one must read a scale of exactly 1. Built with -DSMSKD_EMULATE_FAST_MATH, the kernel's exp2f / log2f
// carry the device's fast-math error and denormals are flushed (fast_math_emulation.h). Built
// with -Xcompiler -mfma -Xcompiler -ffp-contract=fast, the host compiler fuses multiply-adds as
// nvcc does on the device by default, which one-class rows must survive with exact zeros; the
// binary then exits with 77 (skip) on a CPU without FMA instructions.
#include <cfloat>
#include <cstdio>
#include <initializer_list>
#include <random>
#include <utility>
#include <vector>

#include "smskd_oracle.h"
#include "per_row_outputs.h"
#if defined(SMSKD_EMULATE_FAST_MATH)
#include "fast_math_emulation.h"  // the device's ex2/lg2.approx.ftz error, in the kernel code below
#endif
#include "smskd_row_kernel.cuh"
#include "smskd_launch.cuh"  // copy_shared_params: the args -> Params copy the launchers make
#include "merge_emulation.h"  // after the kernel code (and its fast-math emulation)

namespace {

using namespace smskd::oracle;
using smskd::kernels::Params;
using smskd::kernels::copy_shared_params;
using smskd::kernels::RowCache;
using smskd::kernels::RowMath;
using smskd::kernels::RowResult;
using smskd::kernels::RowStats;
using smskd::kernels::RowSweep;
using smskd::kernels::gradient_scale;
using smskd::kernels::with_gradient_scale;

int failures = 0;
// Largest |kernel - oracle| of each output and the gradient, float32 rows at T = 1 and 2, by the row math's
// kPower (0: each exponential taken; 1, 2: the T = 1 ones from those at T), and at T = 2.5.
double worst_at_12[3][kPerRowOutputs + 1] = {}, worst_other[kPerRowOutputs + 1] = {};

struct Case {
  int64_t cols;
  int64_t offset;  // elements before the row: misaligns the packs when not a multiple of the pack
  bool vectorized;
  bool target, teacher, reference;
  smskd_weighting weighting;
  bool masked;  // some teacher and reference logits are -inf (classes with probability 0)
  float grad_scale;  // the factor of the second gradient written (kernel's grad_scale)
  int64_t cache_packs = 0;  // packs of each stream sweep 1 keeps for sweep 2 (RowCache); 0: none
  float temperature = 2.5f;  // 1 and 2 run the launcher's instantiations for them (temperature_power)
  // Far-out logits (float32 rows of 16 columns or more): kFarShifted, the teacher's row `far` up and the
  // reference's far / 2 down (the KL terms do not change: softmax ignores a shift), as exact as other rows
  // only if each logit is taken relative to its own stream's maximum before s is subtracted (a kernel that
  // summed p (t - s) rounded it to the spacing of far, ~0.06 at 1e6); kFarQuarter, the last quarter of every
  // stream `far` up: each stream's maximum moves far and late, in some threads only, which the corrections of
  // the cross dots follow (p (t - s) is exact there: t and s are close).
  enum FarLayout { kNotFar, kFarShifted, kFarQuarter } far_layout = kNotFar;
  float far = 1e6f;
};

// Case k's logit of stream i (0 student, 1 teacher, 2 reference) at column c, given its random part x.
float case_logit(const Case& k, int i, int64_t c, float x) {
  if (k.masked && i > 0 && c % 7 == 2) return -INFINITY;
  if (k.far_layout == Case::kFarShifted) return i == 1 ? x + k.far : i == 2 ? x - 0.5f * k.far : x;
  if (k.far_layout == Case::kFarQuarter && c >= 3 * k.cols / 4) return x + k.far;
  return x;
}

// The per-row outputs' absolute tolerance against the oracle: float32 sums of `cols` terms at temperature T.
double row_atol(double temperature, int64_t cols) {
  return 2e-5 * (1.0 + temperature * temperature) * std::log(double(cols) + 2.0);
}

// The smallest normal magnitude of the gradient's dtype: a power-of-two scale is exact when the value
// and its scaled value both exceed it (a stored value equal to it may be a rounded subnormal).
double smallest_normal(smskd_dtype dtype) { return dtype == SMSKD_FLOAT16 ? std::ldexp(1.0, -14) : std::ldexp(1.0, -126); }

// Sweep 2 of one row, thread by thread, into g; counts each visited column into visits when given.
// Not inlined, so that a row's gradients with and without grad_scale run the same machine code, as a
// kernel's launches do: a host compiler that contracts multiply-adds (the FMA variant) may contract two
// inlined copies differently, which would break the exact power-of-two relation checked below.
template <typename T, int kThreads, typename Math>
__attribute__((noinline)) void sweep_gradient(const Math& math, const RowResult& res, T* g, int64_t y, const Case& k,
                                              RowCache<T> cache, std::vector<int>* visits) {
  for (int lane = 0; lane < kThreads; ++lane) {
    const RowSweep<T, kThreads> sweep(math.s_row, k.cols, k.vectorized, lane);
    sweep.run_kept(k.cols, cache.packs, [&](int64_t c, int64_t stride, auto packs, auto n, auto kept, int64_t pack) {
      if (visits)
        for (int p = 0; p < decltype(packs)::value; ++p)
          for (int e = 0; e < decltype(n)::value; ++e) ++(*visits)[c + p * stride + e];
      math.template gradient<decltype(packs)::value, decltype(n)::value, decltype(kept)::value>(res, g, y, c, stride,
                                                                                                cache, pack);
    });
  }
}

template <typename T, int kThreads, bool kTarget, bool kTeacher, bool kRef, int kPower>
void run_row(smskd_dtype dtype, const Case& k, std::mt19937& rng) {
  using Math = RowMath<T, kTarget, kTeacher, kRef, kPower>;
  using Streams = smskd::kernels::RowStreams<kTarget, kTeacher, kRef>;
  const size_t elem = sizeof(T);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<unsigned char> raw[3];
  std::vector<double> values[3];
  for (int i = 0; i < 3; ++i) {
    raw[i].assign((k.offset + k.cols) * elem, 0);
    values[i].resize(k.cols);
    for (int64_t c = 0; c < k.cols; ++c) {
      const float x = case_logit(k, i, c, normal(rng));
      encode(dtype, x, raw[i].data() + (k.offset + c) * elem);
      values[i][c] = decode(dtype, raw[i].data() + (k.offset + c) * elem);
    }
  }
  std::vector<unsigned char> grad_raw((k.offset + k.cols) * elem, 0xff);
  std::vector<unsigned char> scaled_raw((k.offset + k.cols) * elem, 0xff);
  const T* s = reinterpret_cast<const T*>(raw[0].data()) + k.offset;
  const T* t = reinterpret_cast<const T*>(raw[1].data()) + k.offset;
  const T* r = reinterpret_cast<const T*>(raw[2].data()) + k.offset;
  T* g = reinterpret_cast<T*>(grad_raw.data()) + k.offset;
  T* g_scaled = reinterpret_cast<T*>(scaled_raw.data()) + k.offset;
  const int64_t y = k.cols / 3;

  smskd_loss_rows_args a{};
  a.temperature = k.temperature, a.ce_weight = 0.7f, a.kd_weight = 1.3f, a.ref_weight = 0.9f;
  a.weighting = k.weighting, a.ignore_index = -100;
  Params prm{};
  copy_shared_params(prm, a);

  const Math math(s, kTeacher ? t : nullptr, kRef ? r : nullptr, a.temperature);
  std::vector<int> visits(k.cols, 0);
  bool misaligned_pack = false;
  auto note = [&](int64_t c, int64_t stride, int packs, int n) {
    for (int p = 0; p < packs; ++p) {
      const T* at = s + c + p * stride;
      if (n > 1 && reinterpret_cast<uintptr_t>(at) % 16 != 0) misaligned_pack = true;
      for (int e = 0; e < n; ++e) ++visits[c + p * stride + e];
    }
  };

  int bad = 0;
  // The row cache's slots, as the kernel's dynamic shared memory would hold them.
  using Slot = typename RowCache<T>::Slot;
  std::vector<Slot> slots(Math::kStreams * k.cache_packs);
  RowCache<T> cache;
  cache.slots = slots.data();
  cache.packs = k.cache_packs;

  // Sweep 1, thread by thread, then the merge the shuffles and shared memory do (merge_emulation.h).
  std::vector<RowStats> threads(kThreads);
  std::vector<int64_t> kept_columns;  // the first column of each pack sweep 1 kept
  for (int lane = 0; lane < kThreads; ++lane) {
    const RowSweep<T, kThreads> sweep(s, k.cols, k.vectorized, lane);
    sweep.run_kept(k.cols, cache.packs, [&](int64_t c, int64_t stride, auto packs, auto n, auto kept, int64_t pack) {
      note(c, stride, decltype(packs)::value, decltype(n)::value);
      if (decltype(kept)::value)
        for (int p = 0; p < decltype(packs)::value; ++p) {
          kept_columns.push_back(c + p * stride);
          if (pack + p * kThreads != (c + p * stride - sweep.head) / smskd::kernels::kPackElements<T> && bad++ < 3)
            std::printf("  pack index %lld is not that of column %lld\n", (long long)(pack + p * kThreads),
                        (long long)(c + p * stride));
        }
      math.template accumulate<decltype(packs)::value, decltype(n)::value, decltype(kept)::value>(threads[lane], c,
                                                                                                  stride, cache, pack);
    });
  }
  const RowStats total = smskd::emulation::merged<Streams>(threads, Math::k1, math.kT);
  const float s_y = kTarget ? smskd::kernels::to_float(s[y]) : 0.0f;
  const float t_y = kTeacher && kTarget ? smskd::kernels::to_float(t[y]) : 0.0f;
  const RowResult res = math.finish(total, s_y, t_y, prm);
  // Every pack below the cache's capacity is kept when that is a multiple of a thread's unrolled pair
  // of packs (as the launcher sizes it) or the whole row; the packs sweep 1 kept are NaN in global
  // memory from here on: sweep 2 must read them from their slots (a NaN in the gradient otherwise),
  // and read every other column from the row.
  const RowSweep<T, kThreads> layout(s, k.cols, k.vectorized, 0);
  const int64_t capacity = std::min(k.cache_packs, layout.packs);
  const bool whole_pairs = k.cache_packs >= layout.packs || k.cache_packs % (2 * kThreads) == 0;
  if (whole_pairs && static_cast<int64_t>(kept_columns.size()) != capacity && bad++ < 3)
    std::printf("  %zu packs kept, want %lld\n", kept_columns.size(), (long long)capacity);
  for (int64_t column : kept_columns)
    for (int i = 0; i < 3; ++i)
      for (int e = 0; e < smskd::kernels::kPackElements<T>; ++e) encode(dtype, NAN, raw[i].data() + (k.offset + column + e) * elem);
  // As the kernel: the scale a launch without grad_scale reads, then one with k.grad_scale.
  const RowResult unscaled = with_gradient_scale(res, gradient_scale(prm, true));
  prm.grad_scale = &k.grad_scale;
  const RowResult scaled = with_gradient_scale(res, gradient_scale(prm, true));
  sweep_gradient<T, kThreads>(math, unscaled, g, y, k, cache, &visits);
  sweep_gradient<T, kThreads>(math, scaled, g_scaled, y, k, cache, nullptr);

  const RowWant w = oracle(values[0], kTeacher ? &values[1] : nullptr, kRef ? &values[2] : nullptr, y, kTarget, a);
  for (int64_t c = 0; c < k.cols; ++c)
    if (visits[c] != 2 && bad++ < 3) std::printf("  column %lld visited %d times (want 2)\n", (long long)c, visits[c]);
  if (k.vectorized && misaligned_pack && bad++ < 3) std::printf("  a pack was not 16-byte aligned\n");
  const double T2 = double(a.temperature) * a.temperature;
  const double atol = row_atol(a.temperature, k.cols);
  const auto got = per_row_values(res), want = per_row_values(w);
  // The error figures printed at the end are those of the rows that are not far out (whose errors scale with far).
  double* worst = smskd::kernels::temperature_power(k.temperature) ? worst_at_12[kPower] : worst_other;
  const bool record = dtype == SMSKD_FLOAT32 && k.far_layout == Case::kNotFar;
  for (int f = 0; f < kPerRowOutputs; ++f) {
    if (record) worst[f] = std::fmax(worst[f], std::fabs(got[f] - want[f]));
    if (!close(got[f], want[f], atol, 1e-4) && bad++ < 8)
      std::printf("  output %d: got %.8g want %.8g\n", f, got[f], want[f]);
  }
  for (int f = 0; f < kPerRowOutputs; ++f)  // the per-row outputs are not scaled
    if (per_row_values(scaled)[f] != got[f] && bad++ < 8) std::printf("  output %d changed with grad_scale\n", f);
  // No grad_scale: the coefficients are finish()'s, bit for bit (so the gradient is too).
  if ((unscaled.a != res.a || unscaled.b != res.b || unscaled.g != res.g) && bad++ < 8)
    std::printf("  without grad_scale the gradient coefficients changed\n");
  // Each probability carries the relative rounding of its row's float32 sums, a thread's sum of about
  // cols / kThreads terms: about 2^-23 sqrt(terms) as a random walk (2500 terms per thread when 16
  // lanes share 40000 columns, a layout the launcher leaves to rows of <= 512; at T = 1, a class of
  // probability 0.86 then differs by 8e-6 relative with the generic math), so that much relative error is
  // allowed beside storage's there. The kPower rows are held to storage's alone (they meet it).
  const double sums_rtol = 2.0 * std::ldexp(1.0, -23) * std::sqrt(k.cols / kThreads + 1.0);
  const double grad_rtol = kPower != 0 ? storage_eps(dtype) : std::fmax(storage_eps(dtype), sums_rtol);
  const double scale = k.grad_scale;
  int exponent = 0;
  const bool power_of_two = std::frexp(std::fabs(scale), &exponent) == 0.5;
  for (int64_t c = 0; c < k.cols; ++c) {
    const double gc = decode(dtype, grad_raw.data() + (k.offset + c) * elem);
    if (record) worst[kPerRowOutputs] = std::fmax(worst[kPerRowOutputs], std::fabs(gc - w.grad[c]));
    if (!close(gc, w.grad[c], 2e-6 * (1.0 + T2), grad_rtol) && bad++ < 8)
      std::printf("  grad[%lld]: got %.8g want %.8g\n", (long long)c, gc, w.grad[c]);
    // Scaled: the same tolerance, its absolute part scaled as the entries are.
    const double sc = decode(dtype, scaled_raw.data() + (k.offset + c) * elem);
    if (!close(sc, scale * w.grad[c], 2e-6 * (1.0 + T2) * std::fabs(scale), grad_rtol) && bad++ < 8)
      std::printf("  grad[%lld] with grad_scale %g: got %.8g want %.8g\n", (long long)c, scale, sc,
                  scale * w.grad[c]);
    const bool normal = std::fmin(std::fabs(gc), std::fabs(scale * gc)) > smallest_normal(dtype);
    if (power_of_two && (normal || (gc == 0.0 && std::fabs(scale) <= 1.0)) && sc != scale * gc &&
        bad++ < 8)
      std::printf("  grad[%lld] with grad_scale %g: got %.8g, not exactly scale * %.8g\n", (long long)c, scale, sc,
                  gc);
  }
  if (k.cols == 1) {
    // One class: softmax is exactly 1, so every loss term and the gradient are exactly 0 (and
    // the teacher's true-class probability exactly 1), whatever the logits' rounding.
    const double zero[4] = {res.loss, res.ce, res.kd, res.ref};
    for (int f = 0; f < 4; ++f)
      if (zero[f] != 0.0 && bad++ < 8) std::printf("  C = 1: output %d is %.3g, not exactly 0\n", f, zero[f]);
    if (kTeacher && kTarget && res.tcp != 1.0f && bad++ < 8) std::printf("  C = 1: tcp is 1 + %.3g\n", res.tcp - 1.0);
    const double g0 = decode(dtype, grad_raw.data() + k.offset * elem);
    if (g0 != 0.0 && bad++ < 8) std::printf("  C = 1: grad is %.3g, not exactly 0\n", g0);
    const double s0 = decode(dtype, scaled_raw.data() + k.offset * elem);
    if (s0 != 0.0 && bad++ < 8) std::printf("  C = 1: grad with grad_scale is %.3g, not exactly 0\n", s0);
  }
  std::printf("%s %-4s threads=%d cols=%lld offset=%lld vectorized=%d target=%d teacher=%d ref=%d weighting=%d "
              "masked=%d far=%d grad_scale=%g T=%g power=%d cache_packs=%lld (%lld columns kept)\n",
              bad ? "FAIL" : "ok  ", name_of(dtype), kThreads, (long long)k.cols, (long long)k.offset, k.vectorized,
              kTarget, kTeacher, kRef, int(k.weighting), k.masked, int(k.far_layout), k.grad_scale, k.temperature, kPower,
              (long long)k.cache_packs,
              (long long)(kept_columns.size() * smskd::kernels::kPackElements<T>));
  if (bad) ++failures;
}

// The row math the launcher (smskd_kernels.cu) would choose for k's inputs and temperature.
template <typename T, int kThreads, bool kTarget, bool kTeacher, bool kRef>
void run_launched_math(smskd_dtype dtype, const Case& k, std::mt19937& rng) {
  if constexpr (kTarget && (kTeacher || kRef)) {
    // Beside the generic math on the same row (a copy of the generator), for the float32 error figures of both.
    std::mt19937 same_row = rng;
    if (smskd::kernels::temperature_power(k.temperature) != 0)
      run_row<T, kThreads, kTarget, kTeacher, kRef, 0>(dtype, k, same_row);
    switch (smskd::kernels::temperature_power(k.temperature)) {
      case 1:
        return run_row<T, kThreads, kTarget, kTeacher, kRef, 1>(dtype, k, rng);
      case 2:
        return run_row<T, kThreads, kTarget, kTeacher, kRef, 2>(dtype, k, rng);
      default:
        break;
    }
  }
  run_row<T, kThreads, kTarget, kTeacher, kRef, 0>(dtype, k, rng);
}

template <typename T, int kThreads>
void run_inputs(smskd_dtype dtype, const Case& k, std::mt19937& rng) {
  if (k.target && k.teacher && k.reference) run_launched_math<T, kThreads, true, true, true>(dtype, k, rng);
  if (k.target && k.teacher && !k.reference) run_launched_math<T, kThreads, true, true, false>(dtype, k, rng);
  if (k.target && !k.teacher && k.reference) run_launched_math<T, kThreads, true, false, true>(dtype, k, rng);
  if (k.target && !k.teacher && !k.reference) run_launched_math<T, kThreads, true, false, false>(dtype, k, rng);
  if (!k.target && k.teacher && !k.reference) run_launched_math<T, kThreads, false, true, false>(dtype, k, rng);
}

template <typename T>
void run_dtype(smskd_dtype dtype, std::mt19937& rng) {
  const int64_t cols_grid[] = {1, 7, 100, 129, 513, 2049, 5003, 40000};
  const int64_t offsets[] = {0, 1, 3};
  for (int64_t cols : cols_grid)
    for (int64_t offset : offsets)
      for (bool vectorized : {true, false}) {
        // grad_scale: powers of two (exact), a mean's 1/3 and a factor above 1, in turn.
        const float scales[] = {0.25f, 1.0f / 3.0f, -0.5f, 3.5f};
        const float scale = scales[(offset + (vectorized ? 0 : 1)) % 4];
        const Case all{cols, offset, vectorized, true, true, true, SMSKD_WEIGHT_INVERSE_TCP, false, scale};
        const Case kd_only{cols, offset, vectorized, false, true, false, SMSKD_WEIGHT_CONSTANT, false, scale};
        const Case ce_ref{cols, offset, vectorized, true, false, true, SMSKD_WEIGHT_CONSTANT, true, scale};
        const Case ce_kd{cols, offset, vectorized, true, true, false, SMSKD_WEIGHT_TCP, true, scale};
        const Case ce{cols, offset, vectorized, true, false, false, SMSKD_WEIGHT_INVERSE_TCP, false, scale};
        const Case masked_all{cols, offset, vectorized, true, true, true, SMSKD_WEIGHT_TCP, true, scale};
        std::vector<Case> cases = {all, kd_only, ce_ref, ce_kd, ce, masked_all};
        if (dtype == SMSKD_FLOAT32 && cols >= 16)
          for (Case::FarLayout far : {Case::kFarShifted, Case::kFarQuarter}) {
            Case far_all = all, far_kd = kd_only;
            far_all.far_layout = far_kd.far_layout = far;
            cases.push_back(far_all);
            cases.push_back(far_kd);
          }
        // T = 1 and T = 2: the instantiations that take softmax(s) and the teacher's T = 1 sums from
        // the exponentials at T (temperature_power); at T = 2.5 each is taken. In turn, so that each
        // temperature meets every offset and vectorization.
        const float temperatures[] = {2.5f, 2.0f, 1.0f};
        const float temperature = temperatures[(cols + offset) % 3];
        // Every layout (the launcher can be told to use any), each with every input combination.
        for (Case k : cases) {
          k.temperature = temperature;
          run_inputs<T, 8>(dtype, k, rng);
          run_inputs<T, 16>(dtype, k, rng);
          run_inputs<T, 32>(dtype, k, rng);
          run_inputs<T, 256>(dtype, k, rng);
          run_inputs<T, 512>(dtype, k, rng);
          // The block-per-row layouts with a row cache: the whole row, a capacity of whole unrolled pairs
          // (part of the longer rows, as the launcher sizes it), and an odd one (a pair straddles it).
          for (int64_t packs : {cols, int64_t{2 * 256}, int64_t{2 * 512}, cols / (2 * smskd::kernels::kPackElements<T>) + 1}) {
            Case cached = k;
            cached.cache_packs = packs;
            if (packs != 2 * 512) run_inputs<T, 256>(dtype, cached, rng);
            if (packs != 2 * 256) run_inputs<T, 512>(dtype, cached, rng);
          }
        }
      }
}

// One logit of a row: stream (0 student, 1 teacher, 2 reference), column, value.
struct Edit {
  int stream;
  int64_t column;
  float value;
};

// The columns of non_finite_row's row.
constexpr int64_t kNonFiniteRowCols = 72;

// One float32 row of 72 classes with `edits`, through sweep 1, the merge and finish(), target 13,
// inverse-TCP weighting; with `want`, also the float64 oracle's results for the same logits. Its 8 threads
// take 16-byte packs (4 columns) in turn, packs p and p + 8 in one chunk while such pairs remain: columns 5
// and 6 share a chunk, 5 and 69 are one thread's two chunks (packs 1 + 9, then 17), 5 and 30 lie in two
// threads; threads 2 to 7 take two packs (one chunk) each.
template <int kPower>
RowResult non_finite_row(const std::vector<Edit>& edits, float temperature, RowWant* want = nullptr) {
  constexpr int kThreads = 8;
  constexpr int64_t kCols = kNonFiniteRowCols, kTargetColumn = 13;
  using Math = RowMath<float, true, true, true, kPower>;
  std::vector<float> x[3];
  for (int i = 0; i < 3; ++i)
    for (int64_t c = 0; c < kCols; ++c) x[i].push_back(2.0f * std::sin(0.7f * c * (i + 1)));
  for (const Edit& e : edits) x[e.stream][e.column] = e.value;
  const Math math(x[0].data(), x[1].data(), x[2].data(), temperature);
  const RowCache<float> cache;
  std::vector<RowStats> threads(kThreads);
  for (int lane = 0; lane < kThreads; ++lane) {
    const RowSweep<float, kThreads> sweep(x[0].data(), kCols, true, lane);
    sweep.run_kept(kCols, cache.packs, [&](int64_t c, int64_t stride, auto packs, auto n, auto kept, int64_t pack) {
      math.template accumulate<decltype(packs)::value, decltype(n)::value, decltype(kept)::value>(threads[lane], c,
                                                                                                  stride, cache, pack);
    });
  }
  const RowStats total =
      smskd::emulation::merged<smskd::kernels::RowStreams<true, true, true>>(threads, Math::k1, math.kT);
  smskd_loss_rows_args a{};
  a.temperature = temperature, a.ce_weight = 0.7f, a.kd_weight = 1.3f, a.ref_weight = 0.9f;
  a.weighting = SMSKD_WEIGHT_INVERSE_TCP, a.ignore_index = -100;
  Params prm{};
  copy_shared_params(prm, a);
  if (want) {
    std::vector<double> d[3];
    for (int i = 0; i < 3; ++i) d[i].assign(x[i].begin(), x[i].end());
    *want = oracle(d[0], &d[1], &d[2], kTargetColumn, true, a);
  }
  return math.finish(total, x[0][kTargetColumn], x[1][kTargetColumn], prm);
}

// The student masked with -inf at columns 0-11 and 32-43 (threads 0 and 1's first chunks, all of thread 2's),
// where the teacher and reference hold float32's lowest finite value (masked_fill(mask, finfo.min)): those
// classes have probability 0, so KD and the reference term are finite, as the oracle's. A cross dot is +inf
// after such a class in a chunk of only those (p > 0 at that chunk's maximum) until its rescale by 0, which
// must give 0 (rescale_cross), not inf x 0; thread 2's, at the merge.
std::vector<Edit> student_masked_where_frozen_lowest() {
  std::vector<Edit> edits;
  for (int64_t c : {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43}) {
    edits.push_back({0, c, -INFINITY});
    edits.push_back({1, c, -FLT_MAX});
    edits.push_back({2, c, -FLT_MAX});
  }
  return edits;
}

// Non-finite logits give CE, TCP and KD as PyTorch's log_softmax does (tests/test_non_finite.py holds
// every backend to the float64 reference; the CUDA kernel runs only on a GPU, its row math here): a +inf
// student logit CE +inf off the target and NaN at it (sum1 is then NaN: inf - inf in an exponent), a
// +inf teacher logit TCP and KD NaN, a NaN student logit CE and KD NaN, a -inf student logit at the
// target CE +inf and off it a finite CE, a -inf teacher logit at the target TCP 0. A NaN beside a +inf
// gives NaN, in whichever chunk or thread each lies (a maximum that skipped the NaN, fmaxf's, took the +inf:
// CE +inf); two +inf, or a +inf beside a -inf, CE +inf. A student -inf where the teacher and reference hold
// float32's lowest (student_masked_where_frozen_lowest): the oracle's finite CE, KD, reference term and loss.
template <int kPower>
void check_non_finite_rows(float temperature) {
  constexpr int64_t kOff = 5, kAt = 13;
  const float inf = INFINITY;
  struct Expect {
    const char* what;
    RowResult res;
    bool ok;
  };
  const RowResult s_inf_off = non_finite_row<kPower>({{0, kOff, inf}}, temperature);
  const RowResult s_inf_at = non_finite_row<kPower>({{0, kAt, inf}}, temperature);
  const RowResult t_inf_off = non_finite_row<kPower>({{1, kOff, inf}}, temperature);
  const RowResult s_nan_off = non_finite_row<kPower>({{0, kOff, NAN}}, temperature);
  const RowResult s_low_at = non_finite_row<kPower>({{0, kAt, -inf}}, temperature);
  const RowResult s_low_off = non_finite_row<kPower>({{0, kOff, -inf}}, temperature);
  const RowResult t_low_at = non_finite_row<kPower>({{1, kAt, -inf}}, temperature);
  const RowResult s_nan_inf_chunk = non_finite_row<kPower>({{0, kOff, NAN}, {0, 6, inf}}, temperature);
  const RowResult s_inf_nan_later = non_finite_row<kPower>({{0, kOff, inf}, {0, 69, NAN}}, temperature);
  const RowResult s_nan_inf_later = non_finite_row<kPower>({{0, kOff, NAN}, {0, 69, inf}}, temperature);
  const RowResult s_nan_inf_threads = non_finite_row<kPower>({{0, kOff, NAN}, {0, 30, inf}}, temperature);
  const RowResult t_nan_inf_threads = non_finite_row<kPower>({{1, 30, inf}, {1, kOff, NAN}}, temperature);
  const RowResult s_two_inf = non_finite_row<kPower>({{0, kOff, inf}, {0, 30, inf}}, temperature);
  const RowResult s_inf_low = non_finite_row<kPower>({{0, kOff, inf}, {0, 30, -inf}}, temperature);
  const auto ce_kd_nan = [](const RowResult& r) { return std::isnan(r.ce) && std::isnan(r.kd); };
  const Expect cases[] = {
      {"student +inf off the target: CE +inf", s_inf_off, s_inf_off.ce == inf},
      {"student +inf at the target: CE NaN", s_inf_at, std::isnan(s_inf_at.ce)},
      {"teacher +inf off the target: TCP and KD NaN", t_inf_off, std::isnan(t_inf_off.tcp) && std::isnan(t_inf_off.kd)},
      {"student NaN off the target: CE and KD NaN", s_nan_off, std::isnan(s_nan_off.ce) && std::isnan(s_nan_off.kd)},
      {"student -inf at the target: CE +inf", s_low_at, s_low_at.ce == inf},
      {"student -inf off the target: CE finite", s_low_off, std::isfinite(s_low_off.ce)},
      {"teacher -inf at the target: TCP 0", t_low_at, t_low_at.tcp == 0.0f},
      {"student NaN and +inf in one chunk: CE and KD NaN", s_nan_inf_chunk, ce_kd_nan(s_nan_inf_chunk)},
      {"student +inf, then NaN a chunk later: CE and KD NaN", s_inf_nan_later, ce_kd_nan(s_inf_nan_later)},
      {"student NaN, then +inf a chunk later: CE and KD NaN", s_nan_inf_later, ce_kd_nan(s_nan_inf_later)},
      {"student NaN and +inf in two threads: CE and KD NaN", s_nan_inf_threads, ce_kd_nan(s_nan_inf_threads)},
      {"teacher +inf and NaN in two threads: TCP and KD NaN", t_nan_inf_threads,
       std::isnan(t_nan_inf_threads.tcp) && std::isnan(t_nan_inf_threads.kd)},
      {"student +inf twice: CE +inf", s_two_inf, s_two_inf.ce == inf},
      {"student +inf and -inf: CE +inf", s_inf_low, s_inf_low.ce == inf},
  };
  for (const Expect& e : cases) {
    std::printf("%s non-finite T=%g power=%d %s (ce %g tcp %g kd %g)\n", e.ok ? "ok  " : "FAIL", temperature, kPower,
                e.what, e.res.ce, e.res.tcp, e.res.kd);
    if (!e.ok) ++failures;
  }
  RowWant want;
  const RowResult masked = non_finite_row<kPower>(student_masked_where_frozen_lowest(), temperature, &want);
  const double atol = row_atol(temperature, kNonFiniteRowCols);
  const bool masked_ok = std::isfinite(want.kd) && std::isfinite(want.ref) && close(masked.ce, want.ce, atol, 1e-4) &&
                         close(masked.kd, want.kd, atol, 1e-4) && close(masked.ref, want.ref, atol, 1e-4) &&
                         close(masked.loss, want.loss, atol, 1e-4);
  std::printf("%s non-finite T=%g power=%d student -inf where teacher and reference hold float32's lowest: "
              "the oracle's finite terms (kd %g want %g, ref %g want %g)\n", masked_ok ? "ok  " : "FAIL", temperature,
              kPower, masked.kd, want.kd, masked.ref, want.ref);
  if (!masked_ok) ++failures;
}

}  // namespace

int main() {
#if defined(__FMA__)
  if (!__builtin_cpu_supports("fma")) {
    std::printf("built with FMA instructions, which this CPU lacks\n");
    return 77;
  }
  std::printf("multiply-adds contracted into FMA where the host compiler chooses\n");
#endif
#if defined(SMSKD_EMULATE_FAST_MATH)
  smskd::fastmath::flush_denormals();
  std::printf("fast-math emulation: ex2/lg2.approx errors at their bounds, denormals flushed\n");
#endif
  std::mt19937 rng(4321);
  run_dtype<float>(SMSKD_FLOAT32, rng);
  run_dtype<__nv_bfloat16>(SMSKD_BFLOAT16, rng);
  run_dtype<__half>(SMSKD_FLOAT16, rng);
  check_non_finite_rows<0>(2.5f);
  check_non_finite_rows<1>(1.0f);
  check_non_finite_rows<2>(2.0f);
#define SMSKD_TEST_OUTPUT_NAME(name) #name,
  const char* names[kPerRowOutputs] = {SMSKD_PER_ROW_OUTPUTS(SMSKD_TEST_OUTPUT_NAME)};
#undef SMSKD_TEST_OUTPUT_NAME
  auto print_worst = [&](const char* what, const double* worst) {
    std::printf("largest |error| against the oracle, float32 rows, %s:", what);
    for (int f = 0; f < kPerRowOutputs; ++f) std::printf(" %s %.3g", names[f], worst[f]);
    std::printf(" grad %.3g\n", worst[kPerRowOutputs]);
  };
  print_worst("T = 2.5", worst_other);
  print_worst("T = 1 and 2, each exponential taken (kPower 0)", worst_at_12[0]);
  print_worst("T = 1, softmax(s) and the T = 1 sums from the exponentials at T (kPower 1)", worst_at_12[1]);
  print_worst("T = 2, the same (kPower 2)", worst_at_12[2]);
  std::printf(failures ? "%d case(s) FAILED\n" : "all host cases passed\n", failures);
  return failures ? 1 : 0;
}
