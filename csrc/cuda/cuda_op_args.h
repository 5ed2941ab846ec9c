// Argument helpers shared by the CUDA operators' wrappers (csrc/cuda/*.cpp):
// the student and temperature checks, the kernels' dtype and weighting enums
// from the operator's arguments (errors name the operator and the argument),
// the per-row outputs and loss scalars of the kernels' argument structs, the
// optional grad_scale, and the checked launch on the current stream.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "grad_scale_arg.h"
#include "op_outputs.h"
#include "reduction_arg.h"
#include "smskd_kernels.h"

namespace smskd::cuda {

using smskd::LossRowsResult;
using smskd::PerRowOutputs;
using smskd::PerRowResult;

// float32/bfloat16/float16 logits; float64 is refused with a pointer to the reference backend.
inline smskd_dtype kernel_dtype(const at::Tensor& student, const char* op) {
  switch (student.scalar_type()) {
    case at::kFloat:
      return SMSKD_FLOAT32;
    case at::kBFloat16:
      return SMSKD_BFLOAT16;
    case at::kHalf:
      return SMSKD_FLOAT16;
    case at::kDouble:
      TORCH_CHECK_TYPE(false, op,
                       " on CUDA supports float32, bfloat16 and float16 logits, got float64; "
                       "use backend='reference' for float64 (e.g. for gradcheck) or cast the logits to float32");
    default:
      TORCH_CHECK_TYPE(false, op, " on CUDA: student must be float32, bfloat16 or float16, got ",
                       student.scalar_type());
  }
}

// A CUDA (N, C) student with C >= 1 and a finite temperature > 0.
inline void check_student_and_temperature(const at::Tensor& student, double temperature, const char* op) {
  TORCH_CHECK(student.is_cuda(), op, ": student must be a CUDA tensor, got ", student.device());
  TORCH_CHECK_VALUE(student.dim() == 2 && student.size(1) >= 1, op,
                    ": student must have shape (N, C) with C >= 1, got ", student.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be a finite number > 0, got ", temperature);
}

// Rows may be strided, columns must be contiguous: a copy only when they are not.
inline at::Tensor with_unit_column_stride(const at::Tensor& logits) {
  return logits.size(1) <= 1 || logits.stride(1) == 1 ? logits : logits.contiguous();
}

// Points a kernel argument struct at the student's rows and at the optional
// reference's and target's (an undefined tensor leaves its pointer NULL).
template <typename KernelArgs>
void set_input_rows(KernelArgs& args, const at::Tensor& student, const at::Tensor& reference,
                    const at::Tensor& target) {
  args.student = student.const_data_ptr();
  args.student_stride = student.stride(0);
  if (reference.defined()) {
    args.reference = reference.const_data_ptr();
    args.reference_stride = reference.stride(0);
  }
  if (target.defined()) {
    args.target = target.const_data_ptr<int64_t>();
    args.target_stride = target.stride(0);
  }
}

// The per-row outputs (SMSKD_PER_ROW_OUTPUTS): float32, one entry per row, on the student's device;
// reduced: laid out for reduce_per_row_outputs (csrc/reduction_arg.h).
inline PerRowOutputs empty_per_row_outputs(int64_t rows, const at::Tensor& student, bool reduced) {
  return smskd::empty_per_row_outputs(rows, student.options().dtype(at::kFloat), reduced);
}

// Points a kernel argument struct (smskd_loss_rows_args or _topk_args) at the
// per-row outputs and sets the loss scalars they share.
template <typename KernelArgs>
void set_outputs_and_scalars(KernelArgs& args, PerRowOutputs& per_row, double temperature, double ce_weight,
                             double kd_weight, double ref_weight, int64_t ignore_index) {
  int k = 0;
#define SMSKD_POINT_AT_OUTPUT(name) args.name = per_row[k++].data_ptr<float>();
  SMSKD_PER_ROW_OUTPUTS(SMSKD_POINT_AT_OUTPUT)
#undef SMSKD_POINT_AT_OUTPUT
  args.temperature = static_cast<float>(temperature);
  args.ce_weight = static_cast<float>(ce_weight);
  args.kd_weight = static_cast<float>(kd_weight);
  args.ref_weight = static_cast<float>(ref_weight);
  args.ignore_index = ignore_index;
}

// grad_scale (schema GRAD_SCALE), checked as the CPU operators check it
// (csrc/grad_scale_arg.h: one float32 value on the student's device), and the
// device address the kernel reads its value from, so that no host
// synchronisation is needed; NULL when absent or when no gradient is written.
inline const float* grad_scale_pointer(const std::optional<at::Tensor>& grad_scale, const at::Tensor& student,
                                       bool writes_grad, const char* op) {
  check_grad_scale(grad_scale, student, op);
  return writes_grad && grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
}

// The shared memory per row in which the dense kernel's block-per-row layouts keep the row between
// their sweeps (smskd_loss_rows_args.row_cache_bytes), from SMSKD_FAST_CUDA_ROW_CACHE_BYTES: unset,
// empty or 0: none (the default until a GPU measurement chooses; docs/perf_notes.md); "max": as much
// as the device lets one block have; N > 0: at most N bytes. Read on every call, so that one process
// can compare both (benchmarks/gpu/speed_of_light.py).
inline int64_t row_cache_bytes_from_environment(const char* op) {
  const char* value = std::getenv("SMSKD_FAST_CUDA_ROW_CACHE_BYTES");
  if (value == nullptr || *value == '\0') return 0;
  if (std::strcmp(value, "max") == 0) return -1;
  char* end = nullptr;
  errno = 0;
  const long long bytes = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(errno == 0 && *end == '\0' && bytes >= 0, op,
                    ": the environment variable SMSKD_FAST_CUDA_ROW_CACHE_BYTES must be a number of bytes >= 0 "
                    "or \"max\", got '", value, "'");
  return bytes;
}

// Refuses what the launcher's check objects to (its message, prefixed by op),
// then enqueues the kernel on the current stream and checks the launch.
template <typename KernelArgs>
void launch_checked(const KernelArgs& args, const char* op, const char* (*invalid)(const KernelArgs*),
                    cudaError_t (*launch)(const KernelArgs*, cudaStream_t)) {
  const char* message = invalid(&args);
  TORCH_CHECK_VALUE(message == nullptr, op, ": ", message ? message : "");
  const cudaError_t status = launch(&args, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

}  // namespace smskd::cuda
