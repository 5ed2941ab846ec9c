/* C ABI of the fused SMSKD row kernels (kernels/smskd_kernels.cu).
 *
 * No PyTorch here: raw device pointers, sizes, row strides and a stream, so that
 * csrc/cuda (the torch operator) and the standalone CMake test share one entry
 * point. The math is SPEC.md section 2, the outputs those of the operator
 * smskd_fast::smskd_loss_rows (csrc/ops.cpp).
 */
#ifndef SMSKD_KERNELS_H_
#define SMSKD_KERNELS_H_

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "smskd_schema.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of the three logits inputs and of the gradient. */
typedef enum {
  SMSKD_FLOAT32 = 0,
  SMSKD_BFLOAT16 = 1,
  SMSKD_FLOAT16 = 2
} smskd_dtype;

/* smskd_weighting (how the reference term's per-row weight w_i is computed) and
 * the list of per-row outputs: kernels/smskd_schema.h. */

/* One float32 output pointer per per-row output (loss, ce, ...), each `rows` long
 * and contiguous. */
#define SMSKD_PER_ROW_OUTPUT_POINTER(name) float* name;

/* Everything one launch needs. Strides count elements between consecutive rows
 * (columns are contiguous). Optional pointers are NULL when absent. */
typedef struct {
  int64_t rows;
  int64_t cols;
  smskd_dtype dtype;

  const void* student;
  int64_t student_stride;
  const void* teacher; /* NULL: kd = tcp = 0 */
  int64_t teacher_stride;
  const void* reference; /* NULL: ref = 0 */
  int64_t reference_stride;
  const int64_t* target; /* NULL: every row valid, ce = tcp = 0 */
  int64_t target_stride;

  /* d loss_i / d student_i in dtype, or NULL for no gradient. grad may equal
   * student (in-place gradient) when grad_stride == student_stride: each
   * element is read before it is overwritten, by the thread that writes it. */
  void* grad;
  int64_t grad_stride;
  /* NULL: 1. Else one float32 on the device: the gradient written is
   * *grad_scale * d loss_i / d student_i (every row), e.g. a mean's 1/n, so that
   * no pass of its own applies it. Read by the kernel (no host sync); the per-row
   * outputs are not scaled. Unused without grad. */
  const float* grad_scale;

  /* Per-row float32 outputs, each `rows` long and contiguous. */
  SMSKD_PER_ROW_OUTPUTS(SMSKD_PER_ROW_OUTPUT_POINTER)

  float temperature; /* > 0 */
  float ce_weight;
  float kd_weight;
  float ref_weight;
  smskd_weighting weighting;
  int64_t ignore_index;

  /* 0: the launcher picks the layout for cols (smskd_loss_rows_config). For
   * tuning: 8 or 16 (lanes of a warp per row), 32 (a warp per row), 256 or 512
   * (a block per row) forces one. */
  int threads_per_row;

  /* Shared memory per row in which a block-per-row layout (256 or 512 threads per row) keeps the
   * row's 16-byte packs between its two sweeps, so that the gradient sweep reads them on chip
   * rather than again from global memory: 0 none; < 0 as much as the device lets one block opt
   * in to; > 0 at most that many bytes. The row's first packs are kept, the rest read twice as
   * without it. Needs the packed path (rows aligned alike modulo 16 bytes); else ignored. */
  int64_t row_cache_bytes;
} smskd_loss_rows_args;

/* Checks the arguments on the host (no device access): NULL when they are
 * usable, else a static message naming the first bad one. */
const char* smskd_loss_rows_invalid(const smskd_loss_rows_args* args);

/* Enqueues the kernel on stream; never synchronises. Returns cudaErrorInvalidValue
 * when smskd_loss_rows_invalid() objects, else the launch's error code.
 *
 * A target outside [0, cols) other than ignore_index trips a device-side
 * assertion (message "smskd: target out of range [0, C) and not ignore_index"),
 * as PyTorch's own nll_loss does: the kernel aborts, the stream reports
 * cudaErrorAssert at its next synchronisation, and the CUDA context is unusable
 * afterwards. This is loud without a host synchronisation on every call. */
cudaError_t smskd_loss_rows_launch(const smskd_loss_rows_args* args, cudaStream_t stream);

/* Which kernel configuration the launcher picks for cols (for reports and
 * benchmarks): threads per row (<= 32: within one warp) and rows per block. */
void smskd_loss_rows_config(int64_t cols, int* threads_per_row, int* rows_per_block);

/* ---- The top-k teacher form: smskd_fast::smskd_loss_rows_topk (smskd_fast/backends/topk.py).
 *
 * The teacher is given per row by its k kept logits (values, classes) and the
 * row's true-class logit and log-sum-exps at T = 1 and at T; the kept classes
 * are also given as a bitmask (bit j % 32 of word j / 32 of the row), so that
 * the rest's student mass R = sum_{j not kept} exp(s_j / T - m) is summed
 * exactly in the dense sweep. Same per-row outputs and gradient as
 * smskd_loss_rows, with KD the coarsened KL of smskd_fast/backends/topk.py. */
typedef struct {
  int64_t rows;
  int64_t cols;
  int64_t k; /* kept classes per row, 1 <= k <= cols */
  smskd_dtype dtype;

  const void* student;
  int64_t student_stride;
  const void* reference; /* NULL: ref = 0 */
  int64_t reference_stride;
  const int64_t* target; /* NULL: every row valid, ce = tcp = 0, weight = 1 (constant) or 0 */
  int64_t target_stride;

  /* The teacher, float32 and int64, rows of k contiguous entries. Indices
   * outside [0, cols) are clamped (never a fault); they must be distinct per row
   * for the result to mean anything (the caller validates). */
  const float* topk_values;
  const int64_t* topk_indices;
  /* (rows, kept_mask_stride) 32-bit words, kept_mask_stride >= ceil(cols / 32):
   * bit j % 32 of word j / 32 is set iff class j is one of the row's indices. */
  const uint32_t* kept_mask;
  int64_t kept_mask_stride;
  const float* true_logit;                 /* rows: t_y */
  const float* log_sum_exp;                /* rows: lse(t) */
  const float* log_sum_exp_at_temperature; /* rows: lse(t / T) */

  /* d loss_i / d student_i in dtype, or NULL; must not alias student (the kept
   * classes' gradient is written after the dense sweep, from student's values). */
  void* grad;
  int64_t grad_stride;
  const float* grad_scale; /* NULL: 1; as in smskd_loss_rows_args */

  SMSKD_PER_ROW_OUTPUTS(SMSKD_PER_ROW_OUTPUT_POINTER)

  /* rows bytes of device scratch: the rows whose rest (the classes not kept) lies so far below the
   * student's maximum that its sum there loses precision are flagged here and redone by a second
   * kernel, which sums the rest at its own maximum. */
  uint8_t* exact_rest;

  float temperature;
  float ce_weight;
  float kd_weight;
  float ref_weight;
  smskd_weighting weighting;
  int64_t ignore_index;
  int threads_per_row; /* as in smskd_loss_rows_args: 0 = automatic */
} smskd_loss_rows_topk_args;

/* Host check of the arguments: NULL when usable, else a message naming the first bad one. */
const char* smskd_loss_rows_topk_invalid(const smskd_loss_rows_topk_args* args);

/* Enqueues the top-k kernel on stream; never synchronises. A target outside
 * [0, cols) other than ignore_index trips the same device-side assertion as
 * smskd_loss_rows_launch. */
cudaError_t smskd_loss_rows_topk_launch(const smskd_loss_rows_topk_args* args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* SMSKD_KERNELS_H_ */
