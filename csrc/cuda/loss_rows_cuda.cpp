// CUDA implementation of smskd_fast::smskd_loss_rows and of its in-place
// variant smskd_loss_rows_inplace_ (schemas in csrc/ops.cpp).
//
// Host code only (compiled by the C++ compiler, not nvcc): checks the tensors,
// allocates the outputs and calls the PyTorch-free launcher of kernels/ on the
// current stream of the student's device. Per-row outputs are float32.
// float64 logits are rejected with a pointer to backend="reference": the
// kernels accumulate in fp32, and float64 on a GPU is for gradcheck-style
// checks, which the float64 reference backend serves exactly.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "cuda/cuda_op_args.h"
#include "smskd_kernels.h"

namespace smskd::cuda {
namespace {

at::Tensor checked_companion(const char* name, const at::Tensor& logits, const at::Tensor& student) {
  TORCH_CHECK_VALUE(logits.sizes() == student.sizes(), "smskd_loss_rows: ", name, " must have the student's shape ",
                    student.sizes(), ", got ", logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == student.scalar_type(), "smskd_loss_rows: ", name,
                   " must have the student's dtype ", student.scalar_type(), ", got ", logits.scalar_type());
  TORCH_CHECK(logits.device() == student.device(), "smskd_loss_rows: ", name, " must be on the student's device ",
              student.device(), ", got ", logits.device());
  return with_unit_column_stride(logits);
}

// int64 class indices on the student's device. Their range is checked by the
// kernel (a device-side assertion), so that no call synchronises with the host.
at::Tensor checked_target(const at::Tensor& target, const at::Tensor& student) {
  TORCH_CHECK_TYPE(at::isIntegralType(target.scalar_type(), /*includeBool=*/false),
                   "smskd_loss_rows: target must hold integer class indices, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == student.size(0), "smskd_loss_rows: target must have shape (",
                    student.size(0), ",), got ", target.sizes());
  TORCH_CHECK(target.device() == student.device(), "smskd_loss_rows: target must be on the student's device ",
              student.device(), ", got ", target.device());
  return target.to(at::kLong);
}

// Checks every input, allocates the per-row outputs and launches the kernel;
// grad (times grad_scale, or the reduction's scale) is written where grad_out points (a new
// tensor, or the student itself); the outputs are reduced as reduction says.
PerRowResult launch(const at::Tensor& student, const std::optional<at::Tensor>& target,
                    const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& reference,
                    double temperature, double ce_weight, double kd_weight, double ref_weight,
                    c10::string_view weighting, int64_t ignore_index, const at::Tensor* grad_out,
                    const std::optional<at::Tensor>& grad_scale, c10::string_view reduction) {
  check_student_and_temperature(student, temperature, "smskd_loss_rows");
  smskd_loss_rows_args args{};
  args.dtype = kernel_dtype(student, "smskd_loss_rows");
  args.weighting = parse_weighting(std::string(weighting), "smskd_loss_rows");
  const c10::cuda::CUDAGuard device_guard(student.device());

  at::Tensor t, r, y;
  if (teacher.has_value()) t = checked_companion("teacher", *teacher, student);
  if (reference.has_value()) r = checked_companion("reference", *reference, student);
  if (target.has_value()) y = checked_target(*target, student);

  args.rows = student.size(0);
  args.cols = student.size(1);
  set_input_rows(args, student, r, y);
  if (t.defined()) {
    args.teacher = t.const_data_ptr();
    args.teacher_stride = t.stride(0);
  }
  if (grad_out != nullptr) {
    args.grad = grad_out->data_ptr();
    args.grad_stride = grad_out->stride(0);
  }
  const Reduction mode = parse_reduction(reduction, "smskd_loss_rows");
  const std::optional<at::Tensor> scale =
      reduction_grad_scale(mode, grad_scale, y, student, ignore_index, "smskd_loss_rows");
  args.grad_scale = grad_scale_pointer(scale, student, grad_out != nullptr, "smskd_loss_rows");

  PerRowOutputs per_row = empty_per_row_outputs(args.rows, student, mode != Reduction::None);
  set_outputs_and_scalars(args, per_row, temperature, ce_weight, kd_weight, ref_weight, ignore_index);
  args.row_cache_bytes = row_cache_bytes_from_environment("smskd_loss_rows");
  launch_checked(args, "smskd_loss_rows", &smskd_loss_rows_invalid, &smskd_loss_rows_launch);
  if (mode != Reduction::None) reduce_per_row_outputs(per_row, scale);
  return per_row_result(per_row);
}

LossRowsResult smskd_loss_rows_cuda(const at::Tensor& student, const std::optional<at::Tensor>& target,
                                    const std::optional<at::Tensor>& teacher,
                                    const std::optional<at::Tensor>& reference, double temperature, double ce_weight,
                                    double kd_weight, double ref_weight, c10::string_view weighting,
                                    int64_t ignore_index, bool compute_grad,
                                    const std::optional<at::Tensor>& grad_scale, c10::string_view reduction) {
  TORCH_CHECK_VALUE(student.dim() == 2, "smskd_loss_rows: student must have shape (N, C) with C >= 1, got ",
                    student.sizes());
  const at::Tensor logits = with_unit_column_stride(student);
  at::Tensor grad = at::empty({compute_grad ? logits.size(0) : 0, logits.size(1)},
                              logits.options().memory_format(at::MemoryFormat::Contiguous));
  return std::tuple_cat(launch(logits, target, teacher, reference, temperature, ce_weight, kd_weight, ref_weight,
                               weighting, ignore_index, compute_grad ? &grad : nullptr, grad_scale, reduction),
                        std::make_tuple(grad));
}

// Writes d loss_i / d student_i over student itself: no N x C gradient buffer.
PerRowResult smskd_loss_rows_inplace_cuda(at::Tensor& student, const std::optional<at::Tensor>& target,
                                          const std::optional<at::Tensor>& teacher,
                                          const std::optional<at::Tensor>& reference, double temperature,
                                          double ce_weight, double kd_weight, double ref_weight,
                                          c10::string_view weighting, int64_t ignore_index,
                                          const std::optional<at::Tensor>& grad_scale, c10::string_view reduction) {
  TORCH_CHECK_VALUE(student.dim() == 2 && (student.size(1) <= 1 || student.stride(1) == 1),
                    "smskd_loss_rows_inplace_: student must be an (N, C) tensor with contiguous columns, got sizes ",
                    student.sizes(), " and strides ", student.strides());
  TORCH_CHECK_VALUE(student.size(0) <= 1 || student.stride(0) >= student.size(1),
                    "smskd_loss_rows_inplace_: student's rows must not overlap (stride(0) >= C), got strides ",
                    student.strides());
  return launch(student, target, teacher, reference, temperature, ce_weight, kd_weight, ref_weight, weighting,
                ignore_index, &student, grad_scale, reduction);
}

}  // namespace
}  // namespace smskd::cuda

TORCH_LIBRARY_IMPL(smskd_fast, CUDA, m) {
  m.impl("smskd_loss_rows", &smskd::cuda::smskd_loss_rows_cuda);
  m.impl("smskd_loss_rows_inplace_", &smskd::cuda::smskd_loss_rows_inplace_cuda);
}
