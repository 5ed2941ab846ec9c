// Argument helpers shared by the CUDA operators' wrappers (csrc/cuda/*.cpp):
// the kernels' dtype and weighting enums from the operator's arguments, with
// errors that name the operator and the argument.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "smskd_kernels.h"

namespace smskd::cuda {

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

inline smskd_weighting parse_weighting(const std::string& weighting, const char* op) {
  if (weighting == "inverse_tcp") return SMSKD_WEIGHT_INVERSE_TCP;
  if (weighting == "tcp") return SMSKD_WEIGHT_TCP;
  if (weighting == "constant") return SMSKD_WEIGHT_CONSTANT;
  TORCH_CHECK_VALUE(false, op, ": weighting must be 'inverse_tcp', 'tcp' or 'constant', got '", weighting, "'");
}

// Rows may be strided, columns must be contiguous: a copy only when they are not.
inline at::Tensor with_unit_column_stride(const at::Tensor& logits) {
  return logits.size(1) <= 1 || logits.stride(1) == 1 ? logits : logits.contiguous();
}

}  // namespace smskd::cuda
