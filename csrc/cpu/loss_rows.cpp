// CPU implementation of smskd_fast::smskd_loss_rows (schema in csrc/ops.cpp):
// argument checks, output allocation, and the choice of the SIMD kernel
// (loss_rows_kernel_impl.h) for the instruction set that this CPU supports.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>

#include "loss_rows_args.h"

namespace smskd::cpu {
namespace {

using LossRowsKernel = void (*)(const LossRowsArgs&);
using LossRowsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The best kernel that this CPU and ATen's capability setting allow; like
// PyTorch's own kernels it honours ATEN_CPU_CAPABILITY (e.g. "default", "avx2").
LossRowsKernel select_kernel() {
  static const LossRowsKernel chosen = [] {
#if SMSKD_CPU_X86_VARIANTS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return &AVX512::loss_rows_kernel;
    if (capability == "AVX2") return &AVX2::loss_rows_kernel;
#endif
    return &DEFAULT::loss_rows_kernel;
  }();
  return chosen;
}

ScalarKind scalar_kind(const at::Tensor& student) {
  switch (student.scalar_type()) {
    case at::kDouble: return ScalarKind::Float64;
    case at::kFloat: return ScalarKind::Float32;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kHalf: return ScalarKind::Float16;
    default:
      TORCH_CHECK_TYPE(false, "smskd_loss_rows: student must be float64, float32, bfloat16 or float16, got ",
                       student.scalar_type());
  }
}

Weighting parse_weighting(const std::string& weighting) {
  if (weighting == "inverse_tcp") return Weighting::InverseTcp;
  if (weighting == "tcp") return Weighting::Tcp;
  if (weighting == "constant") return Weighting::Constant;
  TORCH_CHECK_VALUE(false, "smskd_loss_rows: weighting must be 'inverse_tcp', 'tcp' or 'constant', got '",
                    weighting, "'");
}

LogitsView view_of(const at::Tensor& logits) { return {logits.data_ptr(), logits.stride(0), logits.stride(1)}; }

void check_companion(const char* name, const std::optional<at::Tensor>& logits, const at::Tensor& student) {
  if (!logits.has_value()) return;
  TORCH_CHECK_VALUE(logits->sizes() == student.sizes(), "smskd_loss_rows: ", name,
                    " must have the student's shape ", student.sizes(), ", got ", logits->sizes());
  TORCH_CHECK_TYPE(logits->scalar_type() == student.scalar_type(), "smskd_loss_rows: ", name,
                   " must have the student's dtype ", student.scalar_type(), ", got ", logits->scalar_type());
  TORCH_CHECK(logits->device().is_cpu(), "smskd_loss_rows: ", name, " must be on the CPU, got ", logits->device());
}

// int64 class indices, each in [0, classes) or equal to ignore_index.
at::Tensor checked_target(const at::Tensor& target, int64_t rows, int64_t classes, int64_t ignore_index) {
  TORCH_CHECK_TYPE(at::isIntegralType(target.scalar_type(), /*includeBool=*/false),
                   "smskd_loss_rows: target must hold integer class indices, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == rows, "smskd_loss_rows: target must have shape (",
                    rows, ",), got ", target.sizes());
  TORCH_CHECK(target.device().is_cpu(), "smskd_loss_rows: target must be on the CPU, got ", target.device());
  at::Tensor indices = target.to(at::kLong).contiguous();
  const int64_t* values = indices.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t y = values[i];
    TORCH_CHECK_VALUE(y == ignore_index || (y >= 0 && y < classes), "smskd_loss_rows: target[", i, "] = ", y,
                      " is not a class index in [0, ", classes, ") nor ignore_index = ", ignore_index);
  }
  return indices;
}

LossRowsResult smskd_loss_rows_cpu(const at::Tensor& student, const std::optional<at::Tensor>& target,
                                   const std::optional<at::Tensor>& teacher,
                                   const std::optional<at::Tensor>& reference, double temperature, double ce_weight,
                                   double kd_weight, double ref_weight, c10::string_view weighting,
                                   int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK_VALUE(student.dim() == 2 && student.size(1) >= 1,
                    "smskd_loss_rows: student must have shape (N, C) with C >= 1, got ", student.sizes());
  TORCH_CHECK(student.device().is_cpu(), "smskd_loss_rows: student must be on the CPU, got ", student.device());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "smskd_loss_rows: temperature must be a finite number > 0, got ", temperature);
  check_companion("teacher", teacher, student);
  check_companion("reference", reference, student);

  LossRowsArgs args;
  args.kind = scalar_kind(student);
  args.rows = student.size(0);
  args.classes = student.size(1);
  args.weighting = parse_weighting(std::string(weighting));
  args.temperature = temperature;
  args.ce_weight = ce_weight;
  args.kd_weight = kd_weight;
  args.ref_weight = ref_weight;
  args.ignore_index = ignore_index;

  at::Tensor indices;
  if (target.has_value()) {
    indices = checked_target(*target, args.rows, args.classes, ignore_index);
    args.target = indices.const_data_ptr<int64_t>();
  }
  args.student = view_of(student);
  if (teacher.has_value()) args.teacher = view_of(*teacher);
  if (reference.has_value()) args.reference = view_of(*reference);

  const auto accumulation = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto per_row_options = student.options().dtype(accumulation);
  std::array<at::Tensor, 6> per_row;
  for (size_t k = 0; k < per_row.size(); ++k) {
    per_row[k] = at::empty({args.rows}, per_row_options);
    args.per_row[k] = per_row[k].data_ptr();
  }
  at::Tensor grad = at::empty({compute_grad ? args.rows : 0, args.classes}, student.options());
  if (compute_grad) args.grad = grad.data_ptr();

  if (args.rows > 0) select_kernel()(args);
  return {per_row[0], per_row[1], per_row[2], per_row[3], per_row[4], per_row[5], grad};
}

}  // namespace
}  // namespace smskd::cpu

TORCH_LIBRARY_IMPL(smskd_fast, CPU, m) { m.impl("smskd_loss_rows", &smskd::cpu::smskd_loss_rows_cpu); }
