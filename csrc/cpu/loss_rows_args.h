// The plain-data interface between the CPU operators (loss_rows.cpp,
// loss_rows_topk.cpp) and their SIMD kernels (loss_rows_kernel_impl.h,
// loss_rows_topk_kernel_impl.h, compiled once per instruction set).
//
// Kept free of at::Tensor so that the kernel translation units, which are
// compiled for different instruction sets, share no tensor code with the rest
// of the library.
#pragma once

#include <cstdint>

#include "smskd_schema.h"

// Instruction sets for which a kernel is compiled and chosen at run time: on
// x86-64 (GCC or clang) the AVX2 and AVX-512 variants, each unit compiled with its
// own flags (csrc/cpu/isa_units.json); elsewhere only the portable (DEFAULT) kernel.
#if defined(__GNUC__) && defined(__x86_64__)
#define SMSKD_CPU_X86_VARIANTS 1
#else
#define SMSKD_CPU_X86_VARIANTS 0
#endif

namespace smskd::cpu {

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
  smskd_weighting weighting = SMSKD_WEIGHT_CONSTANT;
  int64_t ignore_index = -100;
  // Per-row outputs, contiguous, in the accumulation type (double for Float64
  // inputs, float otherwise), in the order of SMSKD_PER_ROW_OUTPUTS (smskd_schema.h).
  void* per_row[SMSKD_NUM_PER_ROW_OUTPUTS] = {};
  // (rows, classes) contiguous gradient in the input's type; nullptr for none.
  void* grad = nullptr;
  // The gradient written is grad_scale * d loss_i / d student_i (the op's grad_scale).
  double grad_scale = 1.0;
};

// The teacher in the top-k form (smskd_fast/backends/topk.py) for loss_rows_topk_kernel,
// whose LossRowsArgs has no dense teacher. Per row, the k kept classes sorted by
// index (distinct, in [0, classes)) with their logits in the same order; all
// arrays contiguous, the floating ones in the accumulation type.
struct TopKTeacherView {
  int64_t k = 0;
  const int64_t* sorted_indices = nullptr;         // (rows, k)
  const void* sorted_values = nullptr;             // (rows, k)
  const void* true_logit = nullptr;                // (rows)
  const void* log_sum_exp = nullptr;               // (rows)
  const void* log_sum_exp_at_temperature = nullptr;  // (rows)
};

// One copy of each kernel per instruction set (namespaces match ATen's CPU_CAPABILITY names).
#define SMSKD_CPU_DECLARE_KERNELS                                   \
  void loss_rows_kernel(const LossRowsArgs& args);                  \
  void loss_rows_topk_kernel(const LossRowsArgs& args, const TopKTeacherView& teacher);
namespace DEFAULT { SMSKD_CPU_DECLARE_KERNELS }
#if SMSKD_CPU_X86_VARIANTS
namespace AVX2 { SMSKD_CPU_DECLARE_KERNELS }
namespace AVX512 { SMSKD_CPU_DECLARE_KERNELS }
#endif
#undef SMSKD_CPU_DECLARE_KERNELS

}  // namespace smskd::cpu
