// The operators' outputs and weighting argument as tensors and strings, for
// the CPU and CUDA operators and the schemas of csrc/ops.cpp: every list here
// is expanded from kernels/smskd_schema.h (SMSKD_PER_ROW_OUTPUTS,
// SMSKD_WEIGHTINGS), so that adding a per-row output changes no code here.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstddef>
#include <string>
#include <tuple>
#include <utility>

#include "smskd_schema.h"

namespace smskd {

// The per-row outputs' dtype (and grad_scale's): float64 for a float64 student, else float32.
inline at::ScalarType accumulation_type(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// One tensor per per-row output, in SMSKD_PER_ROW_OUTPUTS order.
using PerRowOutputs = std::array<at::Tensor, SMSKD_NUM_PER_ROW_OUTPUTS>;

namespace detail {
template <std::size_t... I>
auto as_tuple(const PerRowOutputs& per_row, std::index_sequence<I...>) {
  return std::make_tuple(per_row[I]...);
}
}  // namespace detail

// The in-place operator's result (the per-row outputs) and the functional
// operators' result (the per-row outputs, then grad).
using PerRowResult =
    decltype(detail::as_tuple(std::declval<PerRowOutputs>(), std::make_index_sequence<SMSKD_NUM_PER_ROW_OUTPUTS>{}));
using LossRowsResult = decltype(std::tuple_cat(std::declval<PerRowResult>(), std::declval<std::tuple<at::Tensor>>()));

inline PerRowResult per_row_result(const PerRowOutputs& per_row) {
  return detail::as_tuple(per_row, std::make_index_sequence<SMSKD_NUM_PER_ROW_OUTPUTS>{});
}

inline LossRowsResult loss_rows_result(const PerRowOutputs& per_row, const at::Tensor& grad) {
  return std::tuple_cat(per_row_result(per_row), std::make_tuple(grad));
}

// The per-row outputs that reduction "sum" / "mean" sums over the rows (csrc/reduction_arg.h):
// the first four of SMSKD_PER_ROW_OUTPUTS, loss, ce, kd and ref (tests/test_op_schema.py checks
// the order); tcp and weight stay per row.
constexpr int64_t kNumReducedOutputs = 4;
static_assert(kNumReducedOutputs < SMSKD_NUM_PER_ROW_OUTPUTS, "tcp and weight are never reduced");

// Empty per-row outputs: `rows` values each, with the given options (device, dtype). With reduced,
// the first kNumReducedOutputs are the rows of one (kNumReducedOutputs, rows) buffer, so that
// reduce_per_row_outputs sums them in one operation.
inline PerRowOutputs empty_per_row_outputs(int64_t rows, const at::TensorOptions& options, bool reduced = false) {
  PerRowOutputs per_row;
  int64_t k = 0;
  if (reduced) {
    const at::Tensor terms = at::empty({kNumReducedOutputs, rows}, options);
    for (; k < kNumReducedOutputs; ++k) per_row[k] = terms[k];
  }
  for (; k < static_cast<int64_t>(per_row.size()); ++k) per_row[k] = at::empty({rows}, options);
  return per_row;
}

// "Tensor loss, Tensor ce, ..., Tensor weight": the per-row outputs in a schema string.
inline std::string per_row_schema_outputs() {
#define SMSKD_SCHEMA_OUTPUT(name) ", Tensor " #name
  const std::string joined = SMSKD_PER_ROW_OUTPUTS(SMSKD_SCHEMA_OUTPUT);
#undef SMSKD_SCHEMA_OUTPUT
  return joined.substr(2);
}

// The weighting argument's mode; an unknown name is a ValueError that lists the modes.
inline smskd_weighting parse_weighting(c10::string_view weighting, const char* op) {
  smskd_weighting mode;
  if (smskd_weighting_from_name(std::string(weighting).c_str(), &mode)) return mode;
  std::string known;
  for (const char* name : smskd_weighting_names) known += std::string(known.empty() ? "'" : ", '") + name + "'";
  TORCH_CHECK_VALUE(false, op, ": weighting must be one of ", known, ", got '", weighting, "'");
}

}  // namespace smskd
