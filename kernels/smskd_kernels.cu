// The C ABI launcher of kernels/smskd_kernels.h: checks the arguments, picks
// the row layout for C, the packed or scalar path, and which inputs exist, and
// enqueues one smskd_rows_kernel instantiation. No PyTorch dependency.
#include "smskd_kernels.h"
#include "smskd_launch.cuh"
#include "smskd_row_kernel.cuh"

namespace {

using smskd::kernels::default_threads_per_row;
using smskd::kernels::kSmallBlockThreads;
using smskd::kernels::Params;
using smskd::kernels::smskd_rows_kernel;

Params make_params(const smskd_loss_rows_args& a) {
  Params p;
  smskd::kernels::copy_shared_params(p, a);
  p.teacher_stride = a.teacher_stride;
  p.vectorized = smskd::kernels::packs_align(
      a.dtype, {a.student, a.student_stride},
      {{a.teacher, a.teacher_stride}, {a.reference, a.reference_stride}, {a.grad, a.grad_stride}});
  return p;
}

template <typename Layout>
cudaError_t launch_layout(const smskd_loss_rows_args& a, cudaStream_t stream) {
  using T = typename Layout::scalar_t;
  constexpr int kThreads = Layout::kThreads, kRows = Layout::kRows;
  const Params prm = make_params(a);
  const T* s = static_cast<const T*>(a.student);
  const T* t = static_cast<const T*>(a.teacher);
  const T* r = static_cast<const T*>(a.reference);
  T* g = static_cast<T*>(a.grad);
  const dim3 grid = Layout::grid(a.rows), block = Layout::block();
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

}  // namespace

extern "C" void smskd_loss_rows_config(int64_t cols, int* threads_per_row, int* rows_per_block) {
  *threads_per_row = default_threads_per_row(cols);
  *rows_per_block = *threads_per_row <= 32 ? kSmallBlockThreads / *threads_per_row : 1;
}

extern "C" const char* smskd_loss_rows_invalid(const smskd_loss_rows_args* a) {
  if (a == nullptr) return "args must not be NULL";
  if (a->rows < 0) return "rows must be >= 0";
  if (a->cols < 1) return "cols must be >= 1";
  if (const char* invalid = smskd::kernels::launch_scalars_invalid(*a)) return invalid;
  if (a->rows == 0) return nullptr;
  if (a->student == nullptr) return "student must not be NULL";
  if (const char* invalid = smskd::kernels::per_row_outputs_invalid(*a)) return invalid;
  if (a->grad != nullptr && a->rows > 1 && a->grad_stride < a->cols)
    return "grad_stride must be >= cols (rows of grad must not overlap)";
  if (a->grad != nullptr && a->grad == a->student && a->grad_stride != a->student_stride)
    return "an in-place grad (grad == student) needs grad_stride == student_stride";
  return nullptr;
}

extern "C" cudaError_t smskd_loss_rows_launch(const smskd_loss_rows_args* a, cudaStream_t stream) {
  if (smskd_loss_rows_invalid(a) != nullptr) return cudaErrorInvalidValue;
  if (a->rows == 0) return cudaSuccess;
  return smskd::kernels::dispatch_row_layout(a->dtype, a->threads_per_row, a->cols, [&](auto layout) {
    return launch_layout<decltype(layout)>(*a, stream);
  });
}
