// Online (single-pass) softmax statistics shared by the CPU and CUDA kernels.
//
// No PyTorch dependency: plain C++ that also compiles as CUDA device code.
// A row is consumed one value at a time (or in blocks that are merged), keeping a
// running maximum so that exp never overflows. SPEC.md section 2 gives the math:
//   lse(x)  = m + log(sum_c exp(x_c - m))
//   KL(p||q) = sum_c p_c (x_c - z_c)/T - lse(x/T) + lse(z/T),  p = softmax(x/T)
// where the first sum is kept as a p-weighted running sum.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SMSKD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SMSKD_HOST_DEVICE inline
#endif

namespace smskd {

// Running log-sum-exp of a stream of values, plus the exp-weighted mean of a
// second stream (weighted_sum / sum is sum_c softmax(x)_c * v_c).
struct OnlineSoftmax {
  float max = -INFINITY;
  float sum = 0.0f;           // sum_c exp(x_c - max)
  float weighted_sum = 0.0f;  // sum_c exp(x_c - max) * v_c

  // Adds value x with companion v. x = -inf has probability 0 and is skipped,
  // so masked entries never turn the statistics into NaN.
  SMSKD_HOST_DEVICE void add(float x, float v = 0.0f) {
    if (x == -INFINITY) return;
    if (x > max) {
      const float scale = expf(max - x);  // 0 when max is still -inf
      sum = sum * scale + 1.0f;
      weighted_sum = weighted_sum * scale + v;
      max = x;
    } else {
      const float e = expf(x - max);  // NaN x propagates through here
      sum += e;
      weighted_sum += e * v;
    }
  }

  // Combines statistics of two disjoint parts of a row.
  SMSKD_HOST_DEVICE void merge(const OnlineSoftmax& other) {
    if (other.max == -INFINITY && other.sum == 0.0f) return;
    if (max == -INFINITY && sum == 0.0f) {
      *this = other;
      return;
    }
    const float new_max = max > other.max ? max : other.max;
    const float a = expf(max - new_max);
    const float b = expf(other.max - new_max);
    sum = sum * a + other.sum * b;
    weighted_sum = weighted_sum * a + other.weighted_sum * b;
    max = new_max;
  }

  // log sum_c exp(x_c); -inf for an empty or all -inf row.
  SMSKD_HOST_DEVICE float log_sum_exp() const { return max + logf(sum); }

  // sum_c softmax(x)_c * v_c.
  SMSKD_HOST_DEVICE float softmax_mean() const { return weighted_sum / sum; }
};

}  // namespace smskd
