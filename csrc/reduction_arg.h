// The operators' last argument, reduction (csrc/ops.cpp), for the CPU and CUDA
// operators alike. "none": the per-row outputs, as before the argument existed.
// "sum" and "mean": loss, ce, kd and ref come back as 0-d sums over the rows, the
// mean's divided by the number of rows whose target is not ignore_index (all rows
// without a target; at least 1, so no rows give 0, not NaN), and the gradient
// written is that of the reduced loss. The caller then dispatches no reduction of
// its own and backward has nothing to rescale when grad_output is 1: at small C a
// call costs what the host dispatches, not what the kernel does (docs/perf_notes.md).
// Written with ATen calls that run on either device, so the CPU tests check the
// code the CUDA operators run; none synchronises with the host.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "op_outputs.h"

namespace smskd {

enum class Reduction { None, Sum, Mean };

inline Reduction parse_reduction(c10::string_view reduction, const char* op) {
  if (reduction == "none") return Reduction::None;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "mean") return Reduction::Mean;
  TORCH_CHECK_VALUE(false, op, ": reduction must be one of 'none', 'sum', 'mean', got '", reduction, "'");
}

// The factor the kernel writes the gradient with (its grad_scale): the caller's for "none", 1 for
// "sum" (nullopt), for "mean" 1 / max(valid rows, 1) as a 0-d tensor in the accumulation dtype on
// the student's device. The operator owns the scale of a reduction, so grad_scale must be absent.
// target_long: the int64 target the kernel reads, undefined without one (a narrower dtype would
// compare with ignore_index after wrapping it: -100 is 156 in uint8).
inline std::optional<at::Tensor> reduction_grad_scale(Reduction reduction, const std::optional<at::Tensor>& grad_scale,
                                                      const at::Tensor& target_long, const at::Tensor& student,
                                                      int64_t ignore_index, const char* op) {
  if (reduction == Reduction::None) return grad_scale;
  TORCH_CHECK_VALUE(!grad_scale.has_value(), op,
                    ": grad_scale must be None when reduction is 'sum' or 'mean' (the operator then scales the "
                    "gradient itself)");
  if (reduction == Reduction::Sum) return std::nullopt;
  const at::ScalarType accumulation = accumulation_type(student);
  const int64_t rows = student.size(0);
  if (!target_long.defined()) {
    return at::full({}, 1.0 / static_cast<double>(std::max<int64_t>(rows, 1)), student.options().dtype(accumulation));
  }
  // Counted in the accumulation dtype while every partial sum is an exact integer (2^24 rows in
  // float32), else in int64: one operation fewer in the common case.
  const bool exact = rows <= 2 / std::numeric_limits<float>::epsilon() || accumulation == at::kDouble;
  const at::Tensor valid = at::ne(target_long, ignore_index);
  at::Tensor count = exact ? at::sum(valid, accumulation)
                           : at::sum(valid).to(accumulation);
  return count.clamp_min_(1).reciprocal_();
}

// Replaces the first kNumReducedOutputs per-row outputs (loss, ce, kd, ref: the rows of one buffer,
// empty_per_row_outputs(..., reduced=true)) by their sums over the rows, times scale when given;
// each a 0-d tensor of its own (an operator's outputs may not share storage). Two operations on
// any number of rows: one reduction of the buffer, one multi-tensor multiply.
inline void reduce_per_row_outputs(PerRowOutputs& per_row, const std::optional<at::Tensor>& scale) {
  const at::Tensor& first = per_row[0];
  const int64_t rows = first.size(0);
  const at::Tensor terms = first.as_strided({kNumReducedOutputs, rows}, {rows, 1}, first.storage_offset());
  const std::vector<at::Tensor> totals = at::sum(terms, {1}).unbind(0);
  const std::vector<at::Tensor> reduced =
      scale.has_value() ? at::_foreach_mul(totals, *scale) : at::_foreach_mul(totals, at::Scalar(1.0));
  std::copy(reduced.begin(), reduced.end(), per_row.begin());
}

}  // namespace smskd
