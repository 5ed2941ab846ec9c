// Host helpers shared by the kernel tests: dtype encoding, and the float64
// oracle, a plain two-pass implementation of SPEC.md section 2 written
// independently of the kernels' online statistics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "smskd_kernels.h"

namespace smskd {
namespace oracle {

// Values are rounded to the dtype first and the oracle sees the rounded values,
// so that only the kernels' arithmetic is tested.
inline size_t bytes_of(smskd_dtype d) { return d == SMSKD_FLOAT32 ? 4 : 2; }
inline const char* name_of(smskd_dtype d) { return d == SMSKD_FLOAT32 ? "f32" : d == SMSKD_BFLOAT16 ? "bf16" : "f16"; }
inline double storage_eps(smskd_dtype d) { return d == SMSKD_FLOAT32 ? 1e-6 : d == SMSKD_BFLOAT16 ? 1.0 / 256 : 1.0 / 2048; }

inline void encode(smskd_dtype d, float x, unsigned char* out) {
  if (d == SMSKD_FLOAT32) {
    std::memcpy(out, &x, 4);
  } else if (d == SMSKD_BFLOAT16) {
    const __nv_bfloat16 v = __float2bfloat16_rn(x);
    std::memcpy(out, &v, 2);
  } else {
    const __half v = __float2half_rn(x);
    std::memcpy(out, &v, 2);
  }
}

inline double decode(smskd_dtype d, const unsigned char* in) {
  if (d == SMSKD_FLOAT32) {
    float x;
    std::memcpy(&x, in, 4);
    return x;
  }
  if (d == SMSKD_BFLOAT16) {
    __nv_bfloat16 v;
    std::memcpy(&v, in, 2);
    return __bfloat162float(v);
  }
  __half v;
  std::memcpy(&v, in, 2);
  return __half2float(v);
}

// ---- the float64 oracle (SPEC.md section 2), one row at a time.
struct RowWant {
  double loss = 0, ce = 0, kd = 0, ref = 0, tcp = 0, weight = 0;
  std::vector<double> grad;
};

inline std::vector<double> log_softmax(const std::vector<double>& x, double scale) {
  double m = -INFINITY;
  for (double v : x) m = std::max(m, v * scale);
  double s = 0;
  for (double v : x) s += std::exp(v * scale - m);
  std::vector<double> out(x.size());
  for (size_t c = 0; c < x.size(); ++c) out[c] = x[c] * scale - m - std::log(s);
  return out;
}

inline double kl(const std::vector<double>& log_p, const std::vector<double>& log_q) {
  double acc = 0;
  for (size_t c = 0; c < log_p.size(); ++c) {
    const double p = std::exp(log_p[c]);
    if (p != 0.0) acc += p * (log_p[c] - log_q[c]);  // p = 0 (even underflowed) adds 0; a NaN p stays NaN
  }
  return acc;
}

inline RowWant oracle(const std::vector<double>& s, const std::vector<double>* t, const std::vector<double>* r, int64_t y,
               bool has_target, const smskd_loss_rows_args& a) {
  RowWant w;
  const size_t C = s.size();
  w.grad.assign(C, 0.0);
  if (has_target && y == a.ignore_index) return w;
  const double T = a.temperature;
  const auto ls1 = log_softmax(s, 1.0), lsT = log_softmax(s, 1.0 / T);
  std::vector<double> ltT, lrT;
  if (has_target) w.ce = -ls1[y];
  if (t) {
    ltT = log_softmax(*t, 1.0 / T);
    w.kd = T * T * kl(ltT, lsT);
    if (has_target) w.tcp = std::exp(log_softmax(*t, 1.0)[y]);
  }
  if (a.weighting == SMSKD_WEIGHT_CONSTANT) {
    w.weight = 1.0;
  } else if (t && has_target) {
    w.weight = a.weighting == SMSKD_WEIGHT_TCP ? w.tcp : 1.0 - w.tcp;
  }
  if (r) {
    lrT = log_softmax(*r, 1.0 / T);
    w.ref = T * T * w.weight * kl(lrT, lsT);
  }
  w.loss = a.ce_weight * w.ce + a.kd_weight * w.kd + a.ref_weight * w.ref;
  for (size_t c = 0; c < C; ++c) {
    double g = 0;
    if (has_target) g += a.ce_weight * (std::exp(ls1[c]) - (int64_t(c) == y ? 1.0 : 0.0));
    if (t) g += T * a.kd_weight * (std::exp(lsT[c]) - std::exp(ltT[c]));
    if (r) g += T * a.ref_weight * w.weight * (std::exp(lsT[c]) - std::exp(lrT[c]));
    w.grad[c] = g;
  }
  return w;
}

inline bool close(double got, double want, double atol, double rtol) {
  return got == want || std::fabs(got - want) <= atol + rtol * std::fabs(want);  // NaN fails
}

}  // namespace oracle
}  // namespace smskd
