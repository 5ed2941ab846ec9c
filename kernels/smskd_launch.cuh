// Host-side launch plumbing shared by the C ABI launchers of the dense and the
// top-k forms (smskd_kernels.cu, smskd_topk_kernels.cu): the row layout for C,
// the argument checks their structs have in common, the packed-path alignment
// test, the grid, and the dispatch from the runtime dtype and threads per row
// to one compile-time kernel configuration, and the copy of the parameters
// both forms share. No PyTorch dependency.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "smskd_kernels.h"

namespace smskd {
namespace kernels {

// Up to kEighthWarpMaxCols columns 8 lanes own a row (4 rows per warp), up to
// kHalfWarpMaxCols 16 lanes, up to kWarpMaxCols a warp, up to kBlockSmallMaxCols
// a 256-thread block, beyond that a 512-thread block (LLM vocabularies).
// Sub-block layouts run 128-thread blocks.
constexpr int64_t kEighthWarpMaxCols = 128;
constexpr int64_t kHalfWarpMaxCols = 512;
constexpr int64_t kWarpMaxCols = 2048;
constexpr int64_t kBlockSmallMaxCols = 16384;
constexpr int kSmallBlockThreads = 128;

inline int default_threads_per_row(int64_t cols) {
  if (cols <= kEighthWarpMaxCols) return 8;
  if (cols <= kHalfWarpMaxCols) return 16;
  if (cols <= kWarpMaxCols) return 32;
  return cols <= kBlockSmallMaxCols ? 256 : 512;
}

// The checks of the scalars both argument structs share, in the launchers' order.
template <typename Args>
const char* launch_scalars_invalid(const Args& a) {
  if (a.dtype != SMSKD_FLOAT32 && a.dtype != SMSKD_BFLOAT16 && a.dtype != SMSKD_FLOAT16)
    return "dtype must be SMSKD_FLOAT32, SMSKD_BFLOAT16 or SMSKD_FLOAT16";
  if (!smskd_weighting_valid(a.weighting)) return "weighting must be one of the SMSKD_WEIGHT_* values";
  if (!(a.temperature > 0.0f) || std::isinf(a.temperature)) return "temperature must be finite and > 0";
  const int forced = a.threads_per_row;
  if (forced != 0 && forced != 8 && forced != 16 && forced != 32 && forced != 256 && forced != 512)
    return "threads_per_row must be 0 (automatic), 8, 16, 32, 256 or 512";
  return nullptr;
}

template <typename Args>
const char* per_row_outputs_invalid(const Args& a) {
#define SMSKD_CHECK_OUTPUT(name) \
  if (!a.name) return #name " (a per-row output) must not be NULL";
  SMSKD_PER_ROW_OUTPUTS(SMSKD_CHECK_OUTPUT)
#undef SMSKD_CHECK_OUTPUT
  return nullptr;
}

// Copies into a kernel's parameters (Params, TopKParams) the fields that its
// C ABI argument struct shares with the other form's.
template <typename KernelParams, typename Args>
void copy_shared_params(KernelParams& p, const Args& a) {
  p.rows = a.rows;
  p.cols = a.cols;
  p.student_stride = a.student_stride;
  p.reference_stride = a.reference_stride;
  p.target_stride = a.target_stride;
  p.grad_stride = a.grad_stride;
  p.grad_scale = a.grad_scale;
  p.target = a.target;
#define SMSKD_COPY_OUTPUT(name) p.name = a.name;
  SMSKD_PER_ROW_OUTPUTS(SMSKD_COPY_OUTPUT)
#undef SMSKD_COPY_OUTPUT
  p.temperature = a.temperature;
  p.ce_weight = a.ce_weight;
  p.kd_weight = a.kd_weight;
  p.ref_weight = a.ref_weight;
  p.weighting = a.weighting;
  p.ignore_index = a.ignore_index;
}

// One tensor's rows: its base pointer (NULL when absent) and row stride in elements.
struct StridedRows {
  const void* data;
  int64_t stride;
};

// True when the student is element-aligned and every other tensor's rows start
// at the student's row offset modulo 16 bytes, so that one scalar head per row
// aligns the 16-byte packs of all of them.
inline bool packs_align(smskd_dtype dtype, StridedRows student, std::initializer_list<StridedRows> others) {
  const int64_t bytes = dtype == SMSKD_FLOAT32 ? 4 : 2;
  const uintptr_t s = reinterpret_cast<uintptr_t>(student.data);
  if (s % bytes != 0) return false;
  for (const StridedRows& other : others) {
    if (other.data == nullptr) continue;
    if ((reinterpret_cast<uintptr_t>(other.data) - s) % 16 != 0 ||
        (other.stride - student.stride) % (16 / bytes) != 0)
      return false;
  }
  return true;
}

// A kernel configuration: element type, threads per row, rows per block.
template <typename T, int Threads, int Rows>
struct RowLayout {
  using scalar_t = T;
  static constexpr int kThreads = Threads;
  static constexpr int kRows = Rows;

  static dim3 block() { return dim3(kThreads * kRows); }
  static dim3 grid(int64_t rows) {
    const int64_t blocks = (rows + kRows - 1) / kRows;
    return dim3(static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX));  // rows loop beyond
  }
};

// Calls launch(RowLayout<T, threads, rows per block>{}) for the runtime dtype
// and threads per row (0: the default for cols); returns its error code.
template <typename Launch>
cudaError_t dispatch_row_layout(smskd_dtype dtype, int threads_per_row, int64_t cols, Launch&& launch) {
  const int threads = threads_per_row ? threads_per_row : default_threads_per_row(cols);
  auto with_threads = [&](auto dtype_tag) -> cudaError_t {
    using T = decltype(dtype_tag);
    switch (threads) {
      case 8:
        return launch(RowLayout<T, 8, kSmallBlockThreads / 8>{});
      case 16:
        return launch(RowLayout<T, 16, kSmallBlockThreads / 16>{});
      case 32:
        return launch(RowLayout<T, 32, kSmallBlockThreads / 32>{});
      case 256:
        return launch(RowLayout<T, 256, 1>{});
      default:
        return launch(RowLayout<T, 512, 1>{});
    }
  };
  switch (dtype) {
    case SMSKD_FLOAT32:
      return with_threads(float{});
    case SMSKD_BFLOAT16:
      return with_threads(__nv_bfloat16{});
    case SMSKD_FLOAT16:
      return with_threads(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace kernels
}  // namespace smskd
