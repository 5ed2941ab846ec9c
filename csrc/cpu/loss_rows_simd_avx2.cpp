// The AVX2 + FMA copy of the CPU kernels, chosen at run time when the CPU has them.
// The whole translation unit is compiled for AVX2 by the pragma, so setup.py
// needs no per-file flags; nothing here runs unless loss_rows.cpp selects it.
#include "loss_rows_args.h"
#if SMSKD_CPU_X86_VARIANTS
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "loss_rows_kernel_impl.h"
#include "loss_rows_topk_kernel_impl.h"
#endif
