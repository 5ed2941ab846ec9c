// Host-side helpers shared by the CPU operators (loss_rows.cpp, loss_rows_topk.cpp):
// argument checks and conversions into the plain-data kernel arguments, and the
// choice of the instruction set whose kernel copy runs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Version.h>

#include <cmath>
#include <string>
#include <utility>

#include "grad_scale_arg.h"
#include "loss_rows_args.h"
#include "op_outputs.h"
#include "reduction_arg.h"

namespace smskd::cpu {

using smskd::LossRowsResult;
using smskd::PerRowOutputs;

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

// A CPU (N, C) student with C >= 1 and a finite temperature > 0.
inline void check_student_and_temperature(const at::Tensor& student, double temperature, const char* op) {
  TORCH_CHECK_VALUE(student.dim() == 2 && student.size(1) >= 1, op,
                    ": student must have shape (N, C) with C >= 1, got ", student.sizes());
  TORCH_CHECK(student.device().is_cpu(), op, ": student must be on the CPU, got ", student.device());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be a finite number > 0, got ", temperature);
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
    // The wording of the Python check (smskd_fast/backends/base.py check_target_range), which the
    // public API leaves to this one, plus the position.
    TORCH_CHECK_VALUE(y == ignore_index || (y >= 0 && y < classes), op, ": target values must be in [0, ", classes,
                      ") or equal ignore_index=", ignore_index, ", found ", y, " at target[", i, "]");
  }
  return indices;
}

inline void set_loss_scalars(LossRowsArgs& args, double temperature, double ce_weight, double kd_weight,
                             double ref_weight, int64_t ignore_index) {
  args.temperature = temperature;
  args.ce_weight = ce_weight;
  args.kd_weight = kd_weight;
  args.ref_weight = ref_weight;
  args.ignore_index = ignore_index;
}

// grad_scale (schema GRAD_SCALE), checked as every operator checks it (csrc/grad_scale_arg.h), and
// its value for LossRowsArgs::grad_scale: 1 when absent or when no gradient is written. The CPU
// twin of csrc/cuda/cuda_op_args.h's grad_scale_pointer (a CPU tensor's value is read directly).
inline double grad_scale_value(const std::optional<at::Tensor>& grad_scale, const at::Tensor& student,
                               bool writes_grad, const char* op) {
  check_grad_scale(grad_scale, student, op);
  return writes_grad && grad_scale.has_value() ? grad_scale->item<double>() : 1.0;
}

// Allocates the outputs (per-row ones in the accumulation type: float64 for a
// float64 student, else float32; grad (N, C) or (0, C) in the student's dtype)
// and points args at them; reduced: laid out for reduce_per_row_outputs.
inline std::pair<PerRowOutputs, at::Tensor> allocate_outputs(LossRowsArgs& args, const at::Tensor& student,
                                                             bool compute_grad, bool reduced) {
  const PerRowOutputs per_row = empty_per_row_outputs(args.rows, student.options().dtype(accumulation_type(student)),
                                                      reduced);
  for (size_t k = 0; k < per_row.size(); ++k) args.per_row[k] = per_row[k].data_ptr();
  at::Tensor grad = at::empty({compute_grad ? args.rows : 0, args.classes}, student.options());
  if (compute_grad) args.grad = grad.data_ptr();
  return {per_row, grad};
}

// Runs kernel (after the checks, with args filled but for grad_scale and the outputs) and returns the
// operator's result, reduced as the reduction argument says (csrc/reduction_arg.h).
// target_long: the checked int64 target (undefined without one).
template <typename RunKernel>
LossRowsResult run_reduced(LossRowsArgs& args, const at::Tensor& student, const at::Tensor& target_long,
                           bool compute_grad, const std::optional<at::Tensor>& grad_scale, int64_t ignore_index,
                           c10::string_view reduction, const char* op, RunKernel&& kernel) {
  const Reduction mode = parse_reduction(reduction, op);
  const std::optional<at::Tensor> scale =
      reduction_grad_scale(mode, grad_scale, target_long, student, ignore_index, op);
  args.grad_scale = grad_scale_value(scale, student, compute_grad, op);
  auto [per_row, grad] = allocate_outputs(args, student, compute_grad, mode != Reduction::None);
  if (args.rows > 0) kernel();
  if (mode != Reduction::None) reduce_per_row_outputs(per_row, scale);
  return loss_rows_result(per_row, grad);
}

}  // namespace smskd::cpu
