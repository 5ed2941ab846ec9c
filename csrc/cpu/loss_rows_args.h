// The plain-data interface between the CPU operator (loss_rows.cpp) and its
// SIMD kernels (loss_rows_kernel_impl.h compiled once per instruction set).
//
// Kept free of at::Tensor so that the kernel translation units, which are
// compiled for different instruction sets, share no tensor code with the rest
// of the library.
#pragma once

#include <cstdint>

// Instruction sets for which a kernel is compiled and chosen at run time: GCC on
// x86-64 builds AVX2 and AVX-512 variants with `#pragma GCC target`; elsewhere
// only the portable (DEFAULT) kernel is built.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SMSKD_CPU_X86_VARIANTS 1
#else
#define SMSKD_CPU_X86_VARIANTS 0
#endif

namespace smskd::cpu {

enum class Weighting : int { InverseTcp, Tcp, Constant };
enum class ScalarKind : int { Float64, Float32, BFloat16, Float16 };

// A (rows, classes) matrix of logits: element (i, c) at data + i*row_stride + c*col_stride
// (strides in elements). data is nullptr when the input is absent.
struct LogitsView {
  const void* data = nullptr;
  int64_t row_stride = 0;
  int64_t col_stride = 1;
};

struct LossRowsArgs {
  ScalarKind kind = ScalarKind::Float32;
  int64_t rows = 0;
  int64_t classes = 0;
  LogitsView student, teacher, reference;
  const int64_t* target = nullptr;  // rows values, contiguous; nullptr when absent
  double temperature = 1.0;
  double ce_weight = 0.0, kd_weight = 0.0, ref_weight = 0.0;
  Weighting weighting = Weighting::Constant;
  int64_t ignore_index = -100;
  // Per-row outputs, contiguous, in the accumulation type (double for Float64
  // inputs, float otherwise): loss, ce, kd, ref, tcp, weight.
  void* per_row[6] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  // (rows, classes) contiguous gradient in the input's type; nullptr for none.
  void* grad = nullptr;
};

// One kernel per instruction set (namespaces match ATen's CPU_CAPABILITY names).
namespace DEFAULT { void loss_rows_kernel(const LossRowsArgs& args); }
#if SMSKD_CPU_X86_VARIANTS
namespace AVX2 { void loss_rows_kernel(const LossRowsArgs& args); }
namespace AVX512 { void loss_rows_kernel(const LossRowsArgs& args); }
#endif

}  // namespace smskd::cpu
