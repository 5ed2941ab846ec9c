// The C ABI launcher of the top-k teacher form (kernels/smskd_kernels.h):
// checks the arguments, picks the row layout for C (the dense kernel's choice,
// smskd_loss_rows_config) and the packed or scalar path, and enqueues one
// smskd_topk_rows_kernel instantiation. No PyTorch dependency.
#include <climits>
#include <cmath>

#include "smskd_kernels.h"
#include "smskd_topk_row_kernel.cuh"

namespace {

using smskd::kernels::smskd_topk_rows_kernel;
using smskd::kernels::TopKParams;

// True when the reference's and the gradient's rows start at the student's
// row offset modulo 16 bytes, so one scalar head per row aligns all of them.
bool packs_align(const smskd_loss_rows_topk_args& a) {
  const int64_t bytes = a.dtype == SMSKD_FLOAT32 ? 4 : 2;
  const uintptr_t s = reinterpret_cast<uintptr_t>(a.student);
  if (s % bytes != 0) return false;
  auto congruent = [&](const void* p, int64_t stride) {
    return p == nullptr ||
           ((reinterpret_cast<uintptr_t>(p) - s) % 16 == 0 && (stride - a.student_stride) % (16 / bytes) == 0);
  };
  return congruent(a.reference, a.reference_stride) && congruent(a.grad, a.grad_stride);
}

TopKParams make_params(const smskd_loss_rows_topk_args& a) {
  TopKParams p;
  p.rows = a.rows;
  p.cols = a.cols;
  p.k = a.k;
  p.student_stride = a.student_stride;
  p.reference_stride = a.reference_stride;
  p.target_stride = a.target_stride;
  p.mask_stride = a.kept_mask_stride;
  p.grad_stride = a.grad_stride;
  p.target = a.target;
  p.values = a.topk_values;
  p.indices = a.topk_indices;
  p.mask = a.kept_mask;
  p.true_logit = a.true_logit;
  p.lse = a.log_sum_exp;
  p.lse_t = a.log_sum_exp_at_temperature;
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
cudaError_t launch_layout(const smskd_loss_rows_topk_args& a, cudaStream_t stream) {
  const TopKParams prm = make_params(a);
  const T* s = static_cast<const T*>(a.student);
  const T* r = static_cast<const T*>(a.reference);
  T* g = static_cast<T*>(a.grad);
  const int64_t blocks = (a.rows + kRows - 1) / kRows;
  const dim3 grid(static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX));  // rows loop beyond
  const dim3 block(kThreads * kRows);
  if (r) {
    smskd_topk_rows_kernel<T, kThreads, kRows, true><<<grid, block, 0, stream>>>(prm, s, r, g);
  } else {
    smskd_topk_rows_kernel<T, kThreads, kRows, false><<<grid, block, 0, stream>>>(prm, s, r, g);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const smskd_loss_rows_topk_args& a, cudaStream_t stream) {
  int threads = a.threads_per_row, rows_per_block = 1;
  if (threads == 0) smskd_loss_rows_config(a.cols, &threads, &rows_per_block);
  constexpr int kSmallBlock = 128;  // the sub-block layouts' block size, as the dense kernel's
  switch (threads) {
    case 8:
      return launch_layout<T, 8, kSmallBlock / 8>(a, stream);
    case 16:
      return launch_layout<T, 16, kSmallBlock / 16>(a, stream);
    case 32:
      return launch_layout<T, 32, kSmallBlock / 32>(a, stream);
    case 256:
      return launch_layout<T, 256, 1>(a, stream);
    default:
      return launch_layout<T, 512, 1>(a, stream);
  }
}

}  // namespace

extern "C" const char* smskd_loss_rows_topk_invalid(const smskd_loss_rows_topk_args* a) {
  if (a == nullptr) return "args must not be NULL";
  if (a->rows < 0) return "rows must be >= 0";
  if (a->cols < 1) return "cols must be >= 1";
  if (a->k < 1 || a->k > a->cols) return "k must be in [1, cols]";
  if (a->dtype != SMSKD_FLOAT32 && a->dtype != SMSKD_BFLOAT16 && a->dtype != SMSKD_FLOAT16)
    return "dtype must be SMSKD_FLOAT32, SMSKD_BFLOAT16 or SMSKD_FLOAT16";
  if (a->weighting != SMSKD_WEIGHT_INVERSE_TCP && a->weighting != SMSKD_WEIGHT_TCP &&
      a->weighting != SMSKD_WEIGHT_CONSTANT)
    return "weighting must be SMSKD_WEIGHT_INVERSE_TCP, SMSKD_WEIGHT_TCP or SMSKD_WEIGHT_CONSTANT";
  if (!(a->temperature > 0.0f) || std::isinf(a->temperature)) return "temperature must be finite and > 0";
  const int forced = a->threads_per_row;
  if (forced != 0 && forced != 8 && forced != 16 && forced != 32 && forced != 256 && forced != 512)
    return "threads_per_row must be 0 (automatic), 8, 16, 32, 256 or 512";
  if (a->kept_mask_stride < (a->cols + 31) / 32) return "kept_mask_stride must be >= ceil(cols / 32)";
  if (a->rows == 0) return nullptr;
  if (a->student == nullptr) return "student must not be NULL";
  if (!a->topk_values || !a->topk_indices || !a->kept_mask || !a->log_sum_exp_at_temperature)
    return "topk_values, topk_indices, kept_mask and log_sum_exp_at_temperature must not be NULL";
  if (a->target != nullptr && (!a->true_logit || !a->log_sum_exp))
    return "true_logit and log_sum_exp must not be NULL when a target is given";
  if (!a->loss || !a->ce || !a->kd || !a->ref || !a->tcp || !a->weight)
    return "loss, ce, kd, ref, tcp and weight must not be NULL";
  if (a->grad != nullptr && a->grad == a->student) return "grad must not alias student";
  if (a->grad != nullptr && a->rows > 1 && a->grad_stride < a->cols)
    return "grad_stride must be >= cols (rows of grad must not overlap)";
  return nullptr;
}

extern "C" cudaError_t smskd_loss_rows_topk_launch(const smskd_loss_rows_topk_args* a, cudaStream_t stream) {
  if (smskd_loss_rows_topk_invalid(a) != nullptr) return cudaErrorInvalidValue;
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
