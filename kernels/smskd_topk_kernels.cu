// The C ABI launcher of the top-k teacher form (kernels/smskd_kernels.h):
// checks the arguments, picks the row layout for C (the dense kernel's choice,
// smskd_launch.cuh) and the packed or scalar path, and enqueues one
// smskd_topk_rows_kernel instantiation, then the exact-rest kernel over the rows it
// flagged (smskd_topk_row_kernel.cuh). No PyTorch dependency.
#include "smskd_kernels.h"
#include "smskd_launch.cuh"
#include "smskd_topk_row_kernel.cuh"

namespace {

using smskd::kernels::smskd_topk_exact_rest_kernel;
using smskd::kernels::smskd_topk_rows_kernel;
using smskd::kernels::TopKParams;

TopKParams make_params(const smskd_loss_rows_topk_args& a) {
  TopKParams p;
  smskd::kernels::copy_shared_params(p, a);
  p.k = a.k;
  p.mask_stride = a.kept_mask_stride;
  p.values = a.topk_values;
  p.indices = a.topk_indices;
  p.mask = a.kept_mask;
  p.true_logit = a.true_logit;
  p.lse = a.log_sum_exp;
  p.lse_t = a.log_sum_exp_at_temperature;
  p.exact_rest = a.exact_rest;
  p.vectorized = smskd::kernels::packs_align(a.dtype, {a.student, a.student_stride},
                                              {{a.reference, a.reference_stride}, {a.grad, a.grad_stride}});
  return p;
}

// The instantiation for the inputs and temperature: with a target at T = 1 or T = 2, the one that
// takes softmax(s) from the exponentials at T (temperature_power).
template <typename Layout, bool kRef>
cudaError_t launch_inputs(const smskd_loss_rows_topk_args& a, cudaStream_t stream) {
  using T = typename Layout::scalar_t;
  constexpr int kThreads = Layout::kThreads, kRows = Layout::kRows;
  const TopKParams prm = make_params(a);
  const T* s = static_cast<const T*>(a.student);
  const T* r = static_cast<const T*>(a.reference);
  T* g = static_cast<T*>(a.grad);
  const dim3 grid = Layout::grid(a.rows), block = Layout::block();
  switch (a.target != nullptr ? smskd::kernels::temperature_power(a.temperature) : 0) {
    case 1:
      smskd_topk_rows_kernel<T, kThreads, kRows, kRef, 1><<<grid, block, 0, stream>>>(prm, s, r, g);
      break;
    case 2:
      smskd_topk_rows_kernel<T, kThreads, kRows, kRef, 2><<<grid, block, 0, stream>>>(prm, s, r, g);
      break;
    default:
      smskd_topk_rows_kernel<T, kThreads, kRows, kRef, 0><<<grid, block, 0, stream>>>(prm, s, r, g);
  }
  if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  // The flagged rows again; a block that meets none of them only reads its rows' flags.
  constexpr int64_t kExactRestBlocks = 1024;
  const dim3 exact_grid(static_cast<unsigned>(a.rows < kExactRestBlocks ? a.rows : kExactRestBlocks));
  smskd_topk_exact_rest_kernel<T, kRef><<<exact_grid, smskd::kernels::kExactRestThreads, 0, stream>>>(prm, s, r, g);
  return cudaGetLastError();
}

template <typename Layout>
cudaError_t launch_layout(const smskd_loss_rows_topk_args& a, cudaStream_t stream) {
  return a.reference ? launch_inputs<Layout, true>(a, stream) : launch_inputs<Layout, false>(a, stream);
}

}  // namespace

extern "C" const char* smskd_loss_rows_topk_invalid(const smskd_loss_rows_topk_args* a) {
  if (a == nullptr) return "args must not be NULL";
  if (a->rows < 0) return "rows must be >= 0";
  if (a->cols < 1) return "cols must be >= 1";
  if (a->k < 1 || a->k > a->cols) return "k must be in [1, cols]";
  if (const char* invalid = smskd::kernels::launch_scalars_invalid(*a)) return invalid;
  if (a->kept_mask_stride < (a->cols + 31) / 32) return "kept_mask_stride must be >= ceil(cols / 32)";
  if (a->rows == 0) return nullptr;
  if (a->student == nullptr) return "student must not be NULL";
  if (!a->topk_values || !a->topk_indices || !a->kept_mask || !a->log_sum_exp_at_temperature)
    return "topk_values, topk_indices, kept_mask and log_sum_exp_at_temperature must not be NULL";
  if (a->exact_rest == nullptr) return "exact_rest must not be NULL (rows bytes of scratch)";
  if (a->target != nullptr && (!a->true_logit || !a->log_sum_exp))
    return "true_logit and log_sum_exp must not be NULL when a target is given";
  if (const char* invalid = smskd::kernels::per_row_outputs_invalid(*a)) return invalid;
  if (a->grad != nullptr && a->grad == a->student) return "grad must not alias student";
  if (a->grad != nullptr && a->rows > 1 && a->grad_stride < a->cols)
    return "grad_stride must be >= cols (rows of grad must not overlap)";
  return nullptr;
}

extern "C" cudaError_t smskd_loss_rows_topk_launch(const smskd_loss_rows_topk_args* a, cudaStream_t stream) {
  if (smskd_loss_rows_topk_invalid(a) != nullptr) return cudaErrorInvalidValue;
  if (a->rows == 0) return cudaSuccess;
  return smskd::kernels::dispatch_row_layout(a->dtype, a->threads_per_row, a->cols, [&](auto layout) {
    return launch_layout<decltype(layout)>(*a, stream);
  });
}
