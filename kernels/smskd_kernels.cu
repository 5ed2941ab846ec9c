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

// Sizes the row cache of a block-per-row launch of kernel (Params::row_cache_packs, and the
// dynamic shared memory it needs): what a.row_cache_bytes asks for, at most what the device
// lets one block opt in to beside the kernel's static shared memory; the whole row when that
// fits, else whole unrolled pairs of packs per thread (RowSweep::run_kept keeps no pair in part).
// Opts the kernel in to all the device allows, never less, so that a launch of another size from
// another host thread, or a captured CUDA graph's replay, never finds the limit lowered under it.
// Leaves both as they are (0) when nothing is kept.
template <typename Layout, typename Kernel>
cudaError_t size_row_cache(const smskd_loss_rows_args& a, Kernel kernel, int streams, Params& prm, size_t& bytes) {
  using T = typename Layout::scalar_t;
  if (a.row_cache_bytes == 0 || !prm.vectorized) return cudaSuccess;
  int device = 0, optin = 0;
  cudaFuncAttributes attributes;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status == cudaSuccess) status = cudaFuncGetAttributes(&attributes, kernel);
  if (status != cudaSuccess) return status;
  const int64_t available = int64_t{optin} - static_cast<int64_t>(attributes.sharedSizeBytes);
  const int64_t wanted = a.row_cache_bytes < 0 || a.row_cache_bytes > available ? available : a.row_cache_bytes;
  const int64_t per_pack = int64_t{streams} * smskd::kernels::kPackBytes;
  const int64_t row_packs = a.cols / smskd::kernels::kPackElements<T>;
  const int64_t pair = int64_t{smskd::kernels::RowSweep<T, Layout::kThreads>::kUnroll} * Layout::kThreads;
  const int64_t packs = wanted / per_pack >= row_packs ? row_packs : wanted / per_pack / pair * pair;
  if (packs <= 0) return cudaSuccess;
  prm.row_cache_packs = packs;
  bytes = static_cast<size_t>(packs * per_pack);
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(available));
}

template <typename Layout, typename Kernel>
cudaError_t launch_kernel(const smskd_loss_rows_args& a, cudaStream_t stream, Kernel kernel, int streams) {
  using T = typename Layout::scalar_t;
  Params prm = make_params(a);
  prm.row_cache_packs = 0;
  size_t cache_bytes = 0;
  if constexpr (Layout::kRows == 1) {
    const cudaError_t status = size_row_cache<Layout>(a, kernel, streams, prm, cache_bytes);
    if (status != cudaSuccess) return status;
  }
  kernel<<<Layout::grid(a.rows), Layout::block(), cache_bytes, stream>>>(
      prm, static_cast<const T*>(a.student), static_cast<const T*>(a.teacher), static_cast<const T*>(a.reference),
      static_cast<T*>(a.grad));
  return cudaGetLastError();
}

// The instantiation for the inputs that exist: with a target and a teacher or reference at T = 1 or
// T = 2, the one that derives the T = 1 exponentials from those at T (temperature_power).
template <typename Layout, bool kTeacher, bool kRef>
cudaError_t launch_inputs(const smskd_loss_rows_args& a, cudaStream_t stream) {
  using T = typename Layout::scalar_t;
  constexpr int kThreads = Layout::kThreads, kRows = Layout::kRows;
  constexpr int streams = 1 + int{kTeacher} + int{kRef};
  if constexpr (kTeacher || kRef) {
    if (a.target != nullptr) {
      switch (smskd::kernels::temperature_power(a.temperature)) {
        case 1:
          return launch_kernel<Layout>(a, stream, &smskd_rows_kernel<T, kThreads, kRows, kTeacher, kRef, 1>, streams);
        case 2:
          return launch_kernel<Layout>(a, stream, &smskd_rows_kernel<T, kThreads, kRows, kTeacher, kRef, 2>, streams);
        default:
          break;
      }
    }
  }
  return launch_kernel<Layout>(a, stream, &smskd_rows_kernel<T, kThreads, kRows, kTeacher, kRef, 0>, streams);
}

template <typename Layout>
cudaError_t launch_layout(const smskd_loss_rows_args& a, cudaStream_t stream) {
  if (a.teacher && a.reference) return launch_inputs<Layout, true, true>(a, stream);
  if (a.teacher) return launch_inputs<Layout, true, false>(a, stream);
  if (a.reference) return launch_inputs<Layout, false, true>(a, stream);
  return launch_inputs<Layout, false, false>(a, stream);
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
