// Checks of the top-k teacher's tensors that the CPU and the CUDA operator of
// smskd_fast::smskd_loss_rows_topk (csrc/cpu/loss_rows_topk.cpp,
// csrc/cuda/loss_rows_topk_cuda.cpp) share word for word; errors name the
// operator and the argument.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace smskd {

// k, the kept classes per row: topk_values must be (rows, k) with 1 <= k <= classes.
inline int64_t checked_topk_k(const at::Tensor& topk_values, int64_t rows, int64_t classes, const char* op) {
  TORCH_CHECK_VALUE(topk_values.dim() == 2 && topk_values.size(0) == rows && topk_values.size(1) >= 1 &&
                        topk_values.size(1) <= classes,
                    op, ": topk_values must have shape (", rows, ", k) with 1 <= k <= ", classes, ", got ",
                    topk_values.sizes());
  return topk_values.size(1);
}

inline void check_topk_indices_dtype(const at::Tensor& topk_indices, const char* op) {
  TORCH_CHECK_TYPE(at::isIntegralType(topk_indices.scalar_type(), /*includeBool=*/false), op,
                   ": topk_indices must hold integer class indices, got ", topk_indices.scalar_type());
}

}  // namespace smskd
