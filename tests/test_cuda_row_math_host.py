"""The CUDA row kernel's per-thread arithmetic, emulated on the CPU (no GPU needed).

Compiles kernels/tests/test_row_math_host.cu with nvcc (about 30 s) and runs it:
each thread of a row is run in turn, the statistics merged as the kernel does,
and the loss terms and gradient compared with a float64 two-pass oracle, for
every dtype, layout, input combination, alignment and -inf masked classes; once with the
host's libm, once with the device's fast-math approximations emulated, and once more with those
and the host compiler contracting a * b + c into fused multiply-adds wherever it can, as nvcc
does on the device by default (--fmad=true): a one-class row must still give exact zeros.
Skipped when nvcc is not installed.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from cuda_resource_report import find_tool  # noqa: E402

NVCC = find_tool("nvcc")
FAST_MATH = ["-DSMSKD_EMULATE_FAST_MATH"]
# g++ fuses a * b + c into one rounding only with FMA instructions enabled and contraction allowed.
CONTRACT = ["-Xcompiler", "-mfma", "-Xcompiler", "-ffp-contract=fast"]
VARIANTS = {"libm": [], "fast-math-emulated": FAST_MATH, "fast-math-emulated-fma-contracted": FAST_MATH + CONTRACT}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit)")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_row_math_matches_float64_oracle(tmp_path, variant):
    """fast-math: exp2f / log2f carry the device's ex2/lg2.approx error and denormals flush to zero
    (kernels/tests/fast_math_emulation.h), as the kernel built with --use_fast_math computes.
    fma-contracted: the host compiler fuses multiply-adds as nvcc does on the device (which pairs it
    chooses may differ from nvcc's; the SASS of finish() is what the device runs). The binary exits
    with 77 when built for FMA on a CPU without it."""
    binary = tmp_path / "test_row_math_host"
    kernels = os.path.join(ROOT, "kernels")
    subprocess.run(
        [NVCC, "-std=c++17", "-O2", *VARIANTS[variant], "-I", kernels,
         "-I", os.path.join(kernels, "tests"), os.path.join(kernels, "tests", "test_row_math_host.cu"),
         "-o", str(binary)],
        check=True, capture_output=True, text=True,
    )
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    failed = [line for line in result.stdout.splitlines() if not line.startswith(("ok", "largest"))]
    assert result.returncode == 0, "\n".join(failed[:40])
    assert "all host cases passed" in result.stdout
