// The kernels' per-row outputs in the tests, from the one list of kernels/smskd_schema.h:
// one buffer of kPerRowOutputs * rows floats holds output k (SMSKD_PER_ROW_OUTPUTS order)
// at k * rows, and an oracle's or kernel's result reads as an array in that order.
#pragma once

#include <array>
#include <cstdint>

#include "smskd_schema.h"

constexpr int kPerRowOutputs = SMSKD_NUM_PER_ROW_OUTPUTS;

// Points an argument struct's (smskd_loss_rows(_topk)_args, Params, TopKParams) outputs into base.
template <typename Args>
void point_per_row_outputs(Args& a, float* base, int64_t rows) {
  int64_t k = 0;
#define SMSKD_TEST_POINT_OUTPUT(name) a.name = base + (k++) * rows;
  SMSKD_PER_ROW_OUTPUTS(SMSKD_TEST_POINT_OUTPUT)
#undef SMSKD_TEST_POINT_OUTPUT
}

// A row's per-row fields (RowWant, RowResult, ...) as doubles, in SMSKD_PER_ROW_OUTPUTS order.
template <typename Result>
std::array<double, kPerRowOutputs> per_row_values(const Result& r) {
#define SMSKD_TEST_OUTPUT_VALUE(name) double(r.name),
  return {SMSKD_PER_ROW_OUTPUTS(SMSKD_TEST_OUTPUT_VALUE)};
#undef SMSKD_TEST_OUTPUT_VALUE
}
