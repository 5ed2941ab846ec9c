"""The CUDA row kernel's per-thread arithmetic, emulated on the CPU (no GPU needed).

Compiles kernels/tests/test_row_math_host.cu with nvcc (about 30 s) and runs it:
each thread of a row is run in turn, the statistics merged as the kernel does,
and the loss terms and gradient compared with a float64 two-pass oracle, for
every dtype, layout, input combination, alignment and -inf masked classes; once with the
host's libm and once with the device's fast-math approximations emulated.
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


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit)")
@pytest.mark.parametrize("fast_math", [False, True], ids=["libm", "fast-math-emulated"])
def test_row_math_matches_float64_oracle(tmp_path, fast_math):
    """fast_math: exp2f / log2f carry the device's ex2/lg2.approx error and denormals flush to zero
    (kernels/tests/fast_math_emulation.h), as the kernel built with --use_fast_math computes."""
    binary = tmp_path / "test_row_math_host"
    kernels = os.path.join(ROOT, "kernels")
    subprocess.run(
        [NVCC, "-std=c++17", "-O2", *(["-DSMSKD_EMULATE_FAST_MATH"] if fast_math else []), "-I", kernels,
         "-I", os.path.join(kernels, "tests"), os.path.join(kernels, "tests", "test_row_math_host.cu"),
         "-o", str(binary)],
        check=True, capture_output=True, text=True,
    )
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    failed = [line for line in result.stdout.splitlines() if not line.startswith("ok")]
    assert result.returncode == 0, "\n".join(failed[:40])
    assert "all host cases passed" in result.stdout
