// CPU implementation of smskd_fast::smskd_loss_rows (schema in csrc/ops.cpp):
// argument checks, output allocation, and the choice of the SIMD kernel
// (loss_rows_kernel_impl.h) for the instruction set that this CPU supports.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>

#include "loss_rows_host.h"

namespace smskd::cpu {
namespace {

using LossRowsKernel = void (*)(const LossRowsArgs&);
using LossRowsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr const char* kOp = "smskd_loss_rows";

LossRowsKernel select_kernel() {
  switch (kernel_isa()) {
#if SMSKD_CPU_X86_VARIANTS
    case KernelIsa::Avx512: return &AVX512::loss_rows_kernel;
    case KernelIsa::Avx2: return &AVX2::loss_rows_kernel;
#endif
    default: return &DEFAULT::loss_rows_kernel;
  }
}

void check_companion(const char* name, const std::optional<at::Tensor>& logits, const at::Tensor& student) {
  if (!logits.has_value()) return;
  TORCH_CHECK_VALUE(logits->sizes() == student.sizes(), "smskd_loss_rows: ", name,
                    " must have the student's shape ", student.sizes(), ", got ", logits->sizes());
  TORCH_CHECK_TYPE(logits->scalar_type() == student.scalar_type(), "smskd_loss_rows: ", name,
                   " must have the student's dtype ", student.scalar_type(), ", got ", logits->scalar_type());
  TORCH_CHECK(logits->device().is_cpu(), "smskd_loss_rows: ", name, " must be on the CPU, got ", logits->device());
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
  args.kind = scalar_kind(student, kOp);
  args.rows = student.size(0);
  args.classes = student.size(1);
  args.weighting = parse_weighting(std::string(weighting), kOp);
  args.temperature = temperature;
  args.ce_weight = ce_weight;
  args.kd_weight = kd_weight;
  args.ref_weight = ref_weight;
  args.ignore_index = ignore_index;

  at::Tensor indices;
  if (target.has_value()) {
    indices = checked_target(*target, args.rows, args.classes, ignore_index, kOp);
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
