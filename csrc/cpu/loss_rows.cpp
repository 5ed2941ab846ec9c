// CPU implementation of smskd_fast::smskd_loss_rows (schema in csrc/ops.cpp):
// argument checks, output allocation, and the choice of the SIMD kernel
// (loss_rows_kernel_impl.h) for the instruction set that this CPU supports.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "loss_rows_host.h"

namespace smskd::cpu {
namespace {

using LossRowsKernel = void (*)(const LossRowsArgs&);

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
                                   int64_t ignore_index, bool compute_grad,
                                   const std::optional<at::Tensor>& grad_scale, c10::string_view reduction) {
  check_student_and_temperature(student, temperature, kOp);
  check_companion("teacher", teacher, student);
  check_companion("reference", reference, student);

  LossRowsArgs args;
  args.kind = scalar_kind(student, kOp);
  args.rows = student.size(0);
  args.classes = student.size(1);
  args.weighting = parse_weighting(std::string(weighting), kOp);
  set_loss_scalars(args, temperature, ce_weight, kd_weight, ref_weight, ignore_index);

  at::Tensor indices;
  if (target.has_value()) {
    indices = checked_target(*target, args.rows, args.classes, ignore_index, kOp);
    args.target = indices.const_data_ptr<int64_t>();
  }
  args.student = view_of(student);
  if (teacher.has_value()) args.teacher = view_of(*teacher);
  if (reference.has_value()) args.reference = view_of(*reference);

  return run_reduced(args, student, indices, compute_grad, grad_scale, ignore_index, reduction, kOp,
                     [&args] { select_kernel()(args); });
}

}  // namespace
}  // namespace smskd::cpu

TORCH_LIBRARY_IMPL(smskd_fast, CPU, m) { m.impl("smskd_loss_rows", &smskd::cpu::smskd_loss_rows_cpu); }
