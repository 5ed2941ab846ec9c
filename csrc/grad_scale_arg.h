// The operators' optional argument grad_scale (csrc/ops.cpp), checked on
// the host for the CPU and CUDA operators alike.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "op_outputs.h"

namespace smskd {

// grad_scale, when given, is one value in the accumulation dtype (float64 for a
// float64 student, else float32) on the student's device: the kernels read it
// there (on CUDA without a host synchronisation).
inline void check_grad_scale(const std::optional<at::Tensor>& grad_scale, const at::Tensor& student, const char* op) {
  if (!grad_scale.has_value()) return;
  const at::ScalarType accumulation = accumulation_type(student);
  TORCH_CHECK_VALUE(grad_scale->dim() == 0 || (grad_scale->dim() == 1 && grad_scale->numel() == 1), op,
                    ": grad_scale must be a 0-d tensor (one value), got shape ", grad_scale->sizes());
  TORCH_CHECK_TYPE(grad_scale->scalar_type() == accumulation, op, ": grad_scale must be ", accumulation,
                   " (the accumulation dtype of ", student.scalar_type(), " logits), got ", grad_scale->scalar_type());
  TORCH_CHECK_VALUE(grad_scale->device() == student.device(), op, ": grad_scale must be on the student's device ",
                    student.device(), ", got ", grad_scale->device());
}

}  // namespace smskd
