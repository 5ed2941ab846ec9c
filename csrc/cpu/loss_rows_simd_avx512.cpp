// The AVX-512 copy of the CPU kernels (the instruction subset ATen's AVX512
// capability requires), chosen at run time when the CPU has it. See
// loss_rows_simd_avx2.cpp for how the pragma replaces per-file flags.
#include "loss_rows_args.h"
#if SMSKD_CPU_X86_VARIANTS
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// g++ does not define the ISA macros for a target pragma in C++; headers
// (sleef.h, ATen) test them, so define them to match the pragma.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "loss_rows_kernel_impl.h"
#include "loss_rows_topk_kernel_impl.h"
#endif
