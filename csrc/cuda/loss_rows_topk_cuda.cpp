// CUDA implementation of smskd_fast::smskd_loss_rows_topk (schema in csrc/ops.cpp;
// math in smskd_fast/backends/topk.py, CPU twin csrc/cpu/loss_rows_topk.cpp).
//
// Host code only: checks the tensors (errors name the argument), brings the
// teacher's top-k form to float32 / int64, builds the kept-class bitmask on the
// device (zeros + scatter_add_ of 1 << (j % 32) into word j / 32: indices are
// distinct per row, so the sum is the bitwise or), and calls the PyTorch-free
// launcher of kernels/ on the current stream. Indices are clamped to [0, C)
// first, so a bad index never faults (validation.check_teacher_topk refuses
// them on the public API). float64 is refused as by the dense CUDA operator.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "cuda/cuda_op_args.h"
#include "smskd_kernels.h"
#include "topk_op_checks.h"

namespace smskd::cuda {
namespace {

constexpr const char* kOp = "smskd_loss_rows_topk";

void check_on_device(const char* name, const at::Tensor& tensor, const at::Tensor& student) {
  TORCH_CHECK(tensor.device() == student.device(), kOp, ": ", name, " must be on the student's device ",
              student.device(), ", got ", tensor.device());
}

void check_shape(const char* name, const at::Tensor& tensor, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(tensor.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ", tensor.sizes());
}

// A per-row (N,) or per-kept-entry (N, k) floating tensor of the teacher, as contiguous float32.
at::Tensor teacher_floats(const char* name, const at::Tensor& tensor, at::IntArrayRef shape,
                          const at::Tensor& student) {
  check_shape(name, tensor, shape);
  check_on_device(name, tensor, student);
  TORCH_CHECK_TYPE(at::isFloatingType(tensor.scalar_type()), kOp, ": ", name, " must be a floating tensor, got ",
                   tensor.scalar_type());
  return tensor.to(at::kFloat).contiguous();
}

// (N, ceil(C / 32)) int32 words: bit j % 32 of word j / 32 is set iff class j is kept.
at::Tensor kept_class_mask(const at::Tensor& indices, int64_t classes) {
  const int64_t words = (classes + 31) / 32;
  const at::Tensor bits = at::bitwise_left_shift(at::ones_like(indices), at::bitwise_and(indices, 31)).to(at::kInt);
  return at::zeros({indices.size(0), words}, indices.options().dtype(at::kInt))
      .scatter_add_(1, at::bitwise_right_shift(indices, 5), bits);
}

LossRowsResult smskd_loss_rows_topk_cuda(const at::Tensor& student_in, const std::optional<at::Tensor>& target,
                                     const at::Tensor& topk_values, const at::Tensor& topk_indices,
                                     const at::Tensor& true_logit, const at::Tensor& log_sum_exp,
                                     const at::Tensor& log_sum_exp_at_temperature,
                                     const std::optional<at::Tensor>& reference, double temperature,
                                     double ce_weight, double kd_weight, double ref_weight,
                                     c10::string_view weighting, int64_t ignore_index, bool compute_grad,
                                     const std::optional<at::Tensor>& grad_scale, c10::string_view reduction) {
  check_student_and_temperature(student_in, temperature, kOp);
  smskd_loss_rows_topk_args args{};
  args.dtype = kernel_dtype(student_in, kOp);
  args.weighting = parse_weighting(std::string(weighting), kOp);
  const c10::cuda::CUDAGuard device_guard(student_in.device());
  const at::Tensor student = with_unit_column_stride(student_in);
  args.rows = student.size(0);
  args.cols = student.size(1);

  args.k = checked_topk_k(topk_values, args.rows, args.cols, kOp);
  const at::Tensor values = teacher_floats("topk_values", topk_values, {args.rows, args.k}, student);
  check_shape("topk_indices", topk_indices, {args.rows, args.k});
  check_on_device("topk_indices", topk_indices, student);
  check_topk_indices_dtype(topk_indices, kOp);
  const at::Tensor indices = topk_indices.to(at::kLong).clamp(0, args.cols - 1).contiguous();
  const at::Tensor true_values = teacher_floats("true_logit", true_logit, {args.rows}, student);
  const at::Tensor lse = teacher_floats("log_sum_exp", log_sum_exp, {args.rows}, student);
  const at::Tensor lse_t =
      teacher_floats("log_sum_exp_at_temperature", log_sum_exp_at_temperature, {args.rows}, student);

  at::Tensor r, y;
  if (reference.has_value()) {
    check_shape("reference", *reference, student.sizes());
    check_on_device("reference", *reference, student);
    TORCH_CHECK_TYPE(reference->scalar_type() == student.scalar_type(), kOp,
                     ": reference must have the student's dtype ", student.scalar_type(), ", got ",
                     reference->scalar_type());
    r = with_unit_column_stride(*reference);
  }
  if (target.has_value()) {  // its range is checked by the kernel (a device-side assertion), as the dense op's
    check_shape("target", *target, {args.rows});
    check_on_device("target", *target, student);
    TORCH_CHECK_TYPE(at::isIntegralType(target->scalar_type(), /*includeBool=*/false), kOp,
                     ": target must hold integer class indices, got ", target->scalar_type());
    y = target->to(at::kLong);
  }
  const Reduction mode = parse_reduction(reduction, kOp);
  const std::optional<at::Tensor> scale = reduction_grad_scale(mode, grad_scale, y, student, ignore_index, kOp);
  args.grad_scale = grad_scale_pointer(scale, student, compute_grad, kOp);

  PerRowOutputs per_row = empty_per_row_outputs(args.rows, student, mode != Reduction::None);
  at::Tensor grad = at::empty({compute_grad ? args.rows : 0, args.cols},
                              student.options().memory_format(at::MemoryFormat::Contiguous));
  if (args.rows > 0) {
    const at::Tensor mask = kept_class_mask(indices, args.cols);
    const at::Tensor exact_rest = at::empty({args.rows}, student.options().dtype(at::kByte));  // kernel scratch
    set_input_rows(args, student, r, y);
    args.topk_values = values.const_data_ptr<float>();
    args.topk_indices = indices.const_data_ptr<int64_t>();
    args.kept_mask = reinterpret_cast<const uint32_t*>(mask.const_data_ptr<int32_t>());
    args.kept_mask_stride = mask.stride(0);
    args.true_logit = true_values.const_data_ptr<float>();
    args.log_sum_exp = lse.const_data_ptr<float>();
    args.log_sum_exp_at_temperature = lse_t.const_data_ptr<float>();
    args.exact_rest = exact_rest.data_ptr<uint8_t>();
    if (compute_grad) {
      args.grad = grad.data_ptr();
      args.grad_stride = grad.stride(0);
    }
    set_outputs_and_scalars(args, per_row, temperature, ce_weight, kd_weight, ref_weight, ignore_index);
    launch_checked(args, kOp, &smskd_loss_rows_topk_invalid, &smskd_loss_rows_topk_launch);
  }
  if (mode != Reduction::None) reduce_per_row_outputs(per_row, scale);
  return loss_rows_result(per_row, grad);
}

}  // namespace
}  // namespace smskd::cuda

TORCH_LIBRARY_IMPL(smskd_fast, CUDA, m) { m.impl("smskd_loss_rows_topk", &smskd::cuda::smskd_loss_rows_topk_cuda); }
