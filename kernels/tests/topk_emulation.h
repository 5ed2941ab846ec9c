// The top-k row kernel (kernels/smskd_topk_row_kernel.cuh) emulated on the CPU:
// each thread of a row runs in turn, and the statistics are merged as merge_emulation.h
// says. Shared by the host drivers
// topk_rows_host.cu (inputs from tests/test_cuda_topk_host_math.py) and
// test_topk_kernels.cu --host (the standalone ctest against topk_oracle.h).
#pragma once

#include <vector>

#include "smskd_topk_row_kernel.cuh"
#include "merge_emulation.h"

namespace smskd {
namespace emulation {

using namespace smskd::kernels;

template <typename T, int kThreads, bool kTarget, bool kRef, int kPower, bool kExactRest = false>
void emulate(const TopKParams& prm, const T* student, const T* reference, T* grad) {
  using Math = TopKRowMath<T, kTarget, kRef, kPower, kExactRest>;
  for (int64_t row = 0; row < prm.rows; ++row) {
    if (kExactRest && !prm.exact_rest[row]) continue;
    T* g_row = grad + row * prm.grad_stride;
    int64_t y = 0;
    if (kTarget) {
      y = prm.target[row * prm.target_stride];
      if (y == prm.ignore_index) {
        store_topk_row(prm, row, TopKRowResult{});
        if (!kExactRest) prm.exact_rest[row] = 0;
        for (int lane = 0; lane < kThreads; ++lane) {
          const RowSweep<T, kThreads> sweep(student + row * prm.student_stride, prm.cols, prm.vectorized, lane);
          sweep.run(prm.cols, [&](int64_t c, int64_t stride, auto packs, auto n) {
            zero_chunk<decltype(packs)::value, decltype(n)::value>(g_row, c, stride);
          });
        }
        continue;
      }
    }
    const Math math(prm, student, reference, row);
    const float s_y = kTarget ? to_float(math.s_row[y]) : 0.0f;
    std::vector<TopKRowStats> threads(kThreads);
    std::vector<StreamStats> rest_maxima(kThreads);
    for (int lane = 0; lane < kThreads; ++lane) {
      const RowSweep<T, kThreads> sweep(math.s_row, prm.cols, prm.vectorized, lane);
      sweep.run(prm.cols, [&](int64_t c, int64_t stride, auto packs, auto n) {
        math.template accumulate<decltype(packs)::value, decltype(n)::value>(threads[lane], rest_maxima[lane], c,
                                                                             stride);
      });
    }
    const TopKRowStats st = merged<TopKRowStreams<kTarget, kRef>>(threads, Math::k1, math.kT);
    RestSum rest{st.s.max, st.s.dot};
    if constexpr (kExactRest) {
      const StreamStats rest_max = merged<RestMaxStreams>(rest_maxima, Math::k1, math.kT);
      const float shift = rest_max.max == -INFINITY ? st.s.max : rest_max.max;
      std::vector<RestSum> sums(kThreads, RestSum{shift, 0.0f});
      for (int lane = 0; lane < kThreads; ++lane) {
        const RowSweep<T, kThreads> sweep(math.s_row, prm.cols, prm.vectorized, lane);
        sweep.run(prm.cols, [&](int64_t c, int64_t stride, auto packs, auto n) {
          math.template accumulate_rest<decltype(packs)::value, decltype(n)::value>(sums[lane], c, stride);
        });
      }
      rest = RestSum{shift, merged<RestSumStreams>(sums, Math::k1, math.kT).sum};
    }
    std::vector<KeptStats> kept(kThreads);
    for (int lane = 0; lane < kThreads; ++lane) math.gather(kept[lane], st, lane, kThreads);
    const KeptStats ks = merged<KeptStreams>(kept, Math::k1, math.kT);
    const TopKRowResult res = math.finish(st, ks, rest, s_y, kTarget ? prm.true_logit[row] : 0.0f,
                                          kTarget ? prm.lse[row] : 0.0f, prm);
    store_topk_row(prm, row, res);
    if (!kExactRest) prm.exact_rest[row] = res.exact_rest;
    const TopKRowResult scaled = with_gradient_scale(res, gradient_scale(prm, true));  // prm.grad_scale: host memory
    for (int lane = 0; lane < kThreads; ++lane) {
      const RowSweep<T, kThreads> sweep(math.s_row, prm.cols, prm.vectorized, lane);
      sweep.run(prm.cols, [&](int64_t c, int64_t stride, auto packs, auto n) {
        math.template gradient<decltype(packs)::value, decltype(n)::value>(scaled, g_row, y, c, stride);
      });
    }
    for (int lane = 0; lane < kThreads; ++lane) math.scatter_kept(scaled, g_row, y, lane, kThreads);
  }
}

// With a target, the row math at the launch's temperature power, as smskd_topk_kernels.cu chooses.
template <typename T, int kThreads, bool kRef>
void emulate_with_target(const TopKParams& prm, const T* student, const T* reference, T* grad) {
  switch (temperature_power(prm.temperature)) {
    case 1: return emulate<T, kThreads, true, kRef, 1>(prm, student, reference, grad);
    case 2: return emulate<T, kThreads, true, kRef, 2>(prm, student, reference, grad);
    default: return emulate<T, kThreads, true, kRef, 0>(prm, student, reference, grad);
  }
}

template <typename T, int kThreads>
void emulate_inputs(const TopKParams& prm, const T* student, const T* reference, T* grad) {
  if (prm.target && reference) emulate_with_target<T, kThreads, true>(prm, student, reference, grad);
  if (prm.target && !reference) emulate_with_target<T, kThreads, false>(prm, student, reference, grad);
  if (!prm.target && reference) emulate<T, kThreads, false, true, 0>(prm, student, reference, grad);
  if (!prm.target && !reference) emulate<T, kThreads, false, false, 0>(prm, student, reference, grad);
}

// The exact-rest kernel over the rows the main kernel flagged (kExactRestThreads per row).
template <typename T>
void emulate_exact_rest(const TopKParams& prm, const T* student, const T* reference, T* grad) {
  constexpr int kThreads = kExactRestThreads;
  if (prm.target && reference) emulate<T, kThreads, true, true, 0, true>(prm, student, reference, grad);
  if (prm.target && !reference) emulate<T, kThreads, true, false, 0, true>(prm, student, reference, grad);
  if (!prm.target && reference) emulate<T, kThreads, false, true, 0, true>(prm, student, reference, grad);
  if (!prm.target && !reference) emulate<T, kThreads, false, false, 0, true>(prm, student, reference, grad);
}

// All rows with threads (8, 16, 32, 256 or 512) threads per row, then the exact-rest kernel, as the launcher
// runs them (the flags in a buffer of its own); grad must not be NULL.
template <typename T>
void emulate_topk_rows(int threads, const TopKParams& params, const T* student, const T* reference, T* grad) {
  std::vector<uint8_t> flags(params.rows, 0xff);
  TopKParams prm = params;
  prm.exact_rest = flags.data();
  switch (threads) {
    case 8: emulate_inputs<T, 8>(prm, student, reference, grad); break;
    case 16: emulate_inputs<T, 16>(prm, student, reference, grad); break;
    case 32: emulate_inputs<T, 32>(prm, student, reference, grad); break;
    case 256: emulate_inputs<T, 256>(prm, student, reference, grad); break;
    default: emulate_inputs<T, 512>(prm, student, reference, grad); break;
  }
  emulate_exact_rest<T>(prm, student, reference, grad);
}

}  // namespace emulation
}  // namespace smskd
