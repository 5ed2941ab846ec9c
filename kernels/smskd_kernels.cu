// The C ABI launcher of kernels/smskd_kernels.h: checks the arguments, picks
// the row layout for C, the packed or scalar path, and which inputs exist, and
// enqueues one smskd_rows_kernel instantiation. No PyTorch dependency.
#include <climits>
#include <cmath>

#include "smskd_kernels.h"
#include "smskd_row_kernel.cuh"

namespace {

using smskd::kernels::Params;
using smskd::kernels::smskd_rows_kernel;

// Up to kEighthWarpMaxCols columns 8 lanes own a row (4 rows per warp), up to
// kHalfWarpMaxCols 16 lanes, up to kWarpMaxCols a warp, up to kBlockSmallMaxCols
// a 256-thread block, beyond that a 512-thread block (LLM vocabularies).
// Sub-block layouts run 128-thread blocks.
constexpr int64_t kEighthWarpMaxCols = 128;
constexpr int64_t kHalfWarpMaxCols = 512;
constexpr int64_t kWarpMaxCols = 2048;
constexpr int64_t kBlockSmallMaxCols = 16384;
constexpr int kSmallBlockThreads = 128;

size_t element_size(smskd_dtype dtype) { return dtype == SMSKD_FLOAT32 ? 4 : 2; }

// True when every row of every tensor starts at the same offset modulo 16 bytes
// as the student's row, so one scalar head per row aligns all of them.
bool packs_align(const smskd_loss_rows_args& a) {
  const size_t bytes = element_size(a.dtype);
  const int64_t vec = 16 / static_cast<int64_t>(bytes);
  const uintptr_t s = reinterpret_cast<uintptr_t>(a.student);
  if (s % bytes != 0) return false;
  auto congruent = [&](const void* p, int64_t stride) {
    return p == nullptr ||
           ((reinterpret_cast<uintptr_t>(p) - s) % 16 == 0 && (stride - a.student_stride) % vec == 0);
  };
  return congruent(a.teacher, a.teacher_stride) && congruent(a.reference, a.reference_stride) &&
         congruent(a.grad, a.grad_stride);
}

Params make_params(const smskd_loss_rows_args& a) {
  Params p;
  p.rows = a.rows;
  p.cols = a.cols;
  p.student_stride = a.student_stride;
  p.teacher_stride = a.teacher_stride;
  p.reference_stride = a.reference_stride;
  p.target_stride = a.target_stride;
  p.grad_stride = a.grad_stride;
  p.target = a.target;
  p.loss = a.loss;
  p.ce = a.ce;
  p.kd = a.kd;
  p.ref = a.ref;
  p.tcp = a.tcp;
  p.weight = a.weight;
  p.temperature = a.temperature;
  p.ce_weight = a.ce_weight;
  p.kd_weight = a.kd_weight;
  p.ref_weight = a.ref_weight;
  p.weighting = a.weighting;
  p.ignore_index = a.ignore_index;
  p.vectorized = packs_align(a);
  return p;
}

template <typename T, int kThreads, int kRows>
cudaError_t launch_layout(const smskd_loss_rows_args& a, cudaStream_t stream) {
  const Params prm = make_params(a);
  const T* s = static_cast<const T*>(a.student);
  const T* t = static_cast<const T*>(a.teacher);
  const T* r = static_cast<const T*>(a.reference);
  T* g = static_cast<T*>(a.grad);
  const int64_t blocks = (a.rows + kRows - 1) / kRows;
  const dim3 grid(static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX));  // rows loop beyond
  const dim3 block(kThreads * kRows);
  if (t && r) {
    smskd_rows_kernel<T, kThreads, kRows, true, true><<<grid, block, 0, stream>>>(prm, s, t, r, g);
  } else if (t) {
    smskd_rows_kernel<T, kThreads, kRows, true, false><<<grid, block, 0, stream>>>(prm, s, t, r, g);
  } else if (r) {
    smskd_rows_kernel<T, kThreads, kRows, false, true><<<grid, block, 0, stream>>>(prm, s, t, r, g);
  } else {
    smskd_rows_kernel<T, kThreads, kRows, false, false><<<grid, block, 0, stream>>>(prm, s, t, r, g);
  }
  return cudaGetLastError();
}

int default_threads_per_row(int64_t cols) {
  if (cols <= kEighthWarpMaxCols) return 8;
  if (cols <= kHalfWarpMaxCols) return 16;
  if (cols <= kWarpMaxCols) return 32;
  return cols <= kBlockSmallMaxCols ? 256 : 512;
}

template <typename T>
cudaError_t launch_dtype(const smskd_loss_rows_args& a, cudaStream_t stream) {
  switch (a.threads_per_row ? a.threads_per_row : default_threads_per_row(a.cols)) {
    case 8:
      return launch_layout<T, 8, kSmallBlockThreads / 8>(a, stream);
    case 16:
      return launch_layout<T, 16, kSmallBlockThreads / 16>(a, stream);
    case 32:
      return launch_layout<T, 32, kSmallBlockThreads / 32>(a, stream);
    case 256:
      return launch_layout<T, 256, 1>(a, stream);
    default:
      return launch_layout<T, 512, 1>(a, stream);
  }
}

}  // namespace

extern "C" void smskd_loss_rows_config(int64_t cols, int* threads_per_row, int* rows_per_block) {
  *threads_per_row = default_threads_per_row(cols);
  *rows_per_block = *threads_per_row <= 32 ? kSmallBlockThreads / *threads_per_row : 1;
}

extern "C" const char* smskd_loss_rows_invalid(const smskd_loss_rows_args* a) {
  if (a == nullptr) return "args must not be NULL";
  if (a->rows < 0) return "rows must be >= 0";
  if (a->cols < 1) return "cols must be >= 1";
  if (a->dtype != SMSKD_FLOAT32 && a->dtype != SMSKD_BFLOAT16 && a->dtype != SMSKD_FLOAT16)
    return "dtype must be SMSKD_FLOAT32, SMSKD_BFLOAT16 or SMSKD_FLOAT16";
  if (a->weighting != SMSKD_WEIGHT_INVERSE_TCP && a->weighting != SMSKD_WEIGHT_TCP &&
      a->weighting != SMSKD_WEIGHT_CONSTANT)
    return "weighting must be SMSKD_WEIGHT_INVERSE_TCP, SMSKD_WEIGHT_TCP or SMSKD_WEIGHT_CONSTANT";
  if (!(a->temperature > 0.0f) || std::isinf(a->temperature)) return "temperature must be finite and > 0";
  const int forced = a->threads_per_row;
  if (forced != 0 && forced != 8 && forced != 16 && forced != 32 && forced != 256 && forced != 512)
    return "threads_per_row must be 0 (automatic), 8, 16, 32, 256 or 512";
  if (a->rows == 0) return nullptr;
  if (a->student == nullptr) return "student must not be NULL";
  if (!a->loss || !a->ce || !a->kd || !a->ref || !a->tcp || !a->weight)
    return "loss, ce, kd, ref, tcp and weight must not be NULL";
  if (a->grad != nullptr && a->rows > 1 && a->grad_stride < a->cols)
    return "grad_stride must be >= cols (rows of grad must not overlap)";
  if (a->grad != nullptr && a->grad == a->student && a->grad_stride != a->student_stride)
    return "an in-place grad (grad == student) needs grad_stride == student_stride";
  return nullptr;
}

extern "C" cudaError_t smskd_loss_rows_launch(const smskd_loss_rows_args* a, cudaStream_t stream) {
  if (smskd_loss_rows_invalid(a) != nullptr) return cudaErrorInvalidValue;
  if (a->rows == 0) return cudaSuccess;
  switch (a->dtype) {
    case SMSKD_FLOAT32:
      return launch_dtype<float>(*a, stream);
    case SMSKD_BFLOAT16:
      return launch_dtype<__nv_bfloat16>(*a, stream);
    case SMSKD_FLOAT16:
      return launch_dtype<__half>(*a, stream);
  }
  return cudaErrorInvalidValue;
}
