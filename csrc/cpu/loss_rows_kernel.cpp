// The portable copy of the CPU kernels: ATen's generic Vectorized, which the
// compiler vectorises for the baseline instruction set. Runs where the CPU
// has neither AVX2 nor AVX-512, or with ATEN_CPU_CAPABILITY=default.
// (Kept first in link order, before loss_rows_simd_*.cpp, by its name.)
#define CPU_CAPABILITY DEFAULT
#include "loss_rows_kernel_impl.h"
#include "loss_rows_topk_kernel_impl.h"
