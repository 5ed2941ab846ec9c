"""CI check without a GPU: no CUDA row kernel spills, and the bf16 kernels load 128 bits at a time.

Runs benchmarks/cuda_resource_report.py on the built smskd_fast._C when it holds
CUDA code (seconds), else compiles kernels/ for sm_90 (about a minute); skipped
when the CUDA tools (nvcc, cuobjdump) are not installed. The parsers are also
checked on fixed tool output, so that a spill is known to be caught.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import cuda_resource_report as report  # noqa: E402

BF16_KERNEL = "_ZN5smskd7kernels17smskd_rows_kernelI13__nv_bfloat16Li512ELi1ELb1ELb1ELi0EEEvNS0_6ParamsEPKT_S6_S6_PS4_"
TOPK_KERNEL = "_ZN5smskd7kernels22smskd_topk_rows_kernelI13__nv_bfloat16Li32ELi4ELb1ELi0EEEvNS0_10TopKParamsEPKT_S6_PS4_"
PTXAS_WITH_SPILL = f"""
ptxas info    : Compiling entry function '{BF16_KERNEL}' for 'sm_90'
ptxas info    : Function properties for {BF16_KERNEL}
    8 bytes stack frame, 16 bytes spill stores, 40 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 1536 bytes smem
ptxas info    : Compiling entry function '{TOPK_KERNEL}' for 'sm_90'
ptxas info    : Function properties for {TOPK_KERNEL}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 120 registers, used 0 barriers
"""
RESOURCE_USAGE_WITH_LOCAL = f"""
arch = sm_90
 Function {BF16_KERNEL}:
  REG:64 STACK:8 SHARED:1536 LOCAL:0 CONSTANT[0]:536 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
SASS = f"""
        Function : {BF16_KERNEL}
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/                   LDG.E.U16 R8, desc[UR4][R6.64] ;
"""


def test_ptxas_spill_is_reported():
    kernels = report.parse_ptxas(PTXAS_WITH_SPILL)
    assert [(k.arch, k.registers, k.spill_store_bytes, k.spill_load_bytes, k.shared_bytes) for k in kernels] == [
        ("sm_90", 64, 16, 40, 1536), ("sm_90", 120, 0, 0, 0)
    ]
    assert [k.topk for k in kernels] == [False, True]
    assert kernels[1].label == "bfloat16  32 thr/row x 4 rows, top-k+reference"
    for kernel in kernels:
        kernel.sass_128bit_loads = 1
    _, problems = report.report(kernels, [])
    assert len(problems) == 1 and "spills" in problems[0] and "bfloat16" in problems[0]


def test_labels_name_the_temperature_power_of_dense_kernels():
    at_two = report.KernelUsage(arch="sm_90", mangled=BF16_KERNEL.replace("Lb1ELi0E", "Lb1ELi2E"))
    assert report.KernelUsage(arch="sm_90", mangled=BF16_KERNEL).label == "bfloat16 512 thr/row x 1 rows, teacher+reference"
    assert at_two.label == "bfloat16 512 thr/row x 1 rows, teacher+reference at T=2"
    assert at_two.dtype == "bfloat16" and not at_two.topk


def test_cuobjdump_stack_counts_as_spill():
    kernels = report.parse_resource_usage(RESOURCE_USAGE_WITH_LOCAL)
    assert len(kernels) == 1 and kernels[0].spills


def test_bf16_kernel_without_wide_loads_is_reported():
    counts = report.count_wide_loads_in_sass(SASS)
    assert counts == {BF16_KERNEL: 1}
    kernel = report.KernelUsage(arch="sm_90", mangled=BF16_KERNEL, registers=100, sass_128bit_loads=0)
    topk = report.KernelUsage(arch="sm_90", mangled=TOPK_KERNEL, registers=100, sass_128bit_loads=0)
    _, problems = report.report([kernel, topk], [])
    assert sorted(problems) == sorted(f"sm_90 {k.label}: no 128-bit global load (LDG.E.128) in its SASS"
                                      for k in (kernel, topk))


def test_a_build_without_the_top_k_kernels_is_reported():
    kernel = report.KernelUsage(arch="sm_90", mangled=BF16_KERNEL, registers=100, sass_128bit_loads=4)
    _, problems = report.report([kernel], [])
    assert problems == ["no smskd_topk_rows_kernel instantiation found"]


@pytest.mark.skipif(report.find_tool("cuobjdump") is None, reason="cuobjdump not found (no CUDA toolkit)")
def test_no_spills_and_wide_bf16_loads(tmp_path, cuda_extension_binary):
    binary = cuda_extension_binary
    if binary is not None:
        args = ["--binary", binary]
    elif report.find_tool("nvcc") is not None:
        args = ["--archs", "90"]
    else:
        pytest.skip("no CUDA build of smskd_fast._C and no nvcc to compile kernels/")
    status = report.main(args + ["--out-dir", str(tmp_path)])
    mode = "binary" if binary else "source"
    assert status == 0, (tmp_path / f"cuda_resource_usage_{mode}.txt").read_text()[:6000]
