// Host stand-ins for what `nvcc --use_fast_math` makes of the kernels' float math on the
// device, so that the host tests of the row arithmetic see the device's error, not libm's.
//
// Include after every system and CUDA header and before the kernel header: exp2f and log2f
// then name the emulations below in the kernel code only. Call flush_denormals() first in main.
//   exp2f -> ex2.approx.ftz.f32: relative error at most 2^-22 (PTX ISA), 2^(+-0) = 1 exactly
//            (a documented special case);
//   log2f -> lg2.approx.ftz.f32: absolute error at most 2^-22.6 (PTX ISA); exact at powers of
//            two (assumed: the exponent field is exact and log2 of a mantissa of 1 is 0; the GPU
//            tests of one-class rows check it);
//   ftz   -> subnormal float inputs and results are 0 (flush_denormals sets MXCSR's FTZ and DAZ
//            bits, which also applies to every other float and double operation of the test).
// Each approximation is off by its full documented bound, with a sign drawn from the argument's
// bits (deterministic, and not one systematic direction that would cancel in differences).
// Not emulated: the approximate division (-prec-div=false, within 2 ulp), much below the rest.
#pragma once

#include <xmmintrin.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

// Host and device so that the kernel's host-device functions may call them (only the host does).
#define SMSKD_EMU __host__ __device__ inline

namespace smskd {
namespace fastmath {

inline void flush_denormals() { _mm_setcsr(_mm_getcsr() | 0x8040); }  // FTZ (bit 15) and DAZ (bit 6)

SMSKD_EMU float flush(float x) { return x != 0.0f && std::fabs(x) < FLT_MIN ? std::copysign(0.0f, x) : x; }

// +1 or -1 from a hash of x's bits.
SMSKD_EMU float sign_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits *= 2654435761u;
  return (bits >> 16) & 1u ? 1.0f : -1.0f;
}

SMSKD_EMU float ex2_approx(float x) {
  x = flush(x);
  if (x == 0.0f || std::isnan(x) || std::isinf(x)) return std::exp2(x);
  const double exact = std::exp2(double(x));
  return flush(float(exact * (1.0 + sign_of(x) * std::ldexp(1.0, -22))));
}

SMSKD_EMU float lg2_approx(float x) {
  x = flush(x);
  if (!(x > 0.0f) || std::isinf(x)) return std::log2(x);  // -inf at 0, NaN below, +inf at +inf
  int exponent;
  const float mantissa = std::frexp(x, &exponent);
  if (mantissa == 0.5f) return float(exponent - 1);  // a power of two
  return float(std::log2(double(x)) + sign_of(x) * std::exp2(-22.6));
}

}  // namespace fastmath
}  // namespace smskd

#define exp2f(x) ::smskd::fastmath::ex2_approx(x)
#define log2f(x) ::smskd::fastmath::lg2_approx(x)
