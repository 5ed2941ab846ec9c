// Host-side helpers shared by the CPU operators (loss_rows.cpp, loss_rows_topk.cpp):
// argument checks and conversions into the plain-data kernel arguments, and the
// choice of the instruction set whose kernel copy runs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Version.h>

#include <string>

#include "loss_rows_args.h"

namespace smskd::cpu {

enum class KernelIsa { Default, Avx2, Avx512 };

// The best kernel copy that this CPU and ATen's capability setting allow; like
// PyTorch's own kernels it honours ATEN_CPU_CAPABILITY (e.g. "default", "avx2").
inline KernelIsa kernel_isa() {
  static const KernelIsa chosen = [] {
#if SMSKD_CPU_X86_VARIANTS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return KernelIsa::Avx512;
    if (capability == "AVX2") return KernelIsa::Avx2;
#endif
    return KernelIsa::Default;
  }();
  return chosen;
}

inline ScalarKind scalar_kind(const at::Tensor& student, const char* op) {
  switch (student.scalar_type()) {
    case at::kDouble: return ScalarKind::Float64;
    case at::kFloat: return ScalarKind::Float32;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kHalf: return ScalarKind::Float16;
    default:
      TORCH_CHECK_TYPE(false, op, ": student must be float64, float32, bfloat16 or float16, got ",
                       student.scalar_type());
  }
}

inline Weighting parse_weighting(const std::string& weighting, const char* op) {
  if (weighting == "inverse_tcp") return Weighting::InverseTcp;
  if (weighting == "tcp") return Weighting::Tcp;
  if (weighting == "constant") return Weighting::Constant;
  TORCH_CHECK_VALUE(false, op, ": weighting must be 'inverse_tcp', 'tcp' or 'constant', got '", weighting, "'");
}

inline LogitsView view_of(const at::Tensor& logits) {
  return {logits.data_ptr(), logits.stride(0), logits.stride(1)};
}

// int64 class indices, each in [0, classes) or equal to ignore_index.
inline at::Tensor checked_target(const at::Tensor& target, int64_t rows, int64_t classes, int64_t ignore_index,
                                 const char* op) {
  TORCH_CHECK_TYPE(at::isIntegralType(target.scalar_type(), /*includeBool=*/false), op,
                   ": target must hold integer class indices, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == rows, op, ": target must have shape (", rows,
                    ",), got ", target.sizes());
  TORCH_CHECK(target.device().is_cpu(), op, ": target must be on the CPU, got ", target.device());
  at::Tensor indices = target.to(at::kLong).contiguous();
  const int64_t* values = indices.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t y = values[i];
    TORCH_CHECK_VALUE(y == ignore_index || (y >= 0 && y < classes), op, ": target[", i, "] = ", y,
                      " is not a class index in [0, ", classes, ") nor ignore_index = ", ignore_index);
  }
  return indices;
}

}  // namespace smskd::cpu
