// The portable copy of the CPU kernels: ATen's generic Vectorized, which the
// compiler vectorises for the baseline instruction set. Runs where the CPU
// has neither AVX2 nor AVX-512, or with ATEN_CPU_CAPABILITY=default.
// (setup.py and CMakeLists.txt link it, like every baseline object, before the
// instruction-set units of isa_units.json.)
#define CPU_CAPABILITY DEFAULT
#include "loss_rows_kernel_impl.h"
#include "loss_rows_topk_kernel_impl.h"
