// The AVX-512 copy of the CPU kernels (the instruction subset ATen's AVX512
// capability requires), chosen at run time when the CPU has it. Compiled alone
// with its flags from csrc/cpu/isa_units.json, like loss_rows_simd_avx2.cpp.
#include "loss_rows_args.h"
#if SMSKD_CPU_X86_VARIANTS
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__) || \
    !defined(__AVX2__) || !defined(__FMA__)
#error "compile loss_rows_simd_avx512.cpp with its flags from csrc/cpu/isa_units.json (-mavx512f ... -mavx2 -mfma ...)"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "loss_rows_kernel_impl.h"
#include "loss_rows_topk_kernel_impl.h"
#endif
