// The AVX2 + FMA copy of the CPU kernels, chosen at run time when the CPU has them.
// The build compiles this file alone with the flags that csrc/cpu/isa_units.json
// lists for it (setup.py and CMakeLists.txt both read that file); nothing here
// runs unless loss_rows.cpp selects it.
#include "loss_rows_args.h"
#if SMSKD_CPU_X86_VARIANTS
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "compile loss_rows_simd_avx2.cpp with its flags from csrc/cpu/isa_units.json (-mavx2 -mfma -mf16c ...)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "loss_rows_kernel_impl.h"
#include "loss_rows_topk_kernel_impl.h"
#endif
