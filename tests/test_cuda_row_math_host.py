"""The CUDA row kernel's per-thread arithmetic, emulated on the CPU (no GPU needed).

Compiles kernels/tests/test_row_math_host.cu with nvcc (about 30 s) and runs it:
each thread of a row is run in turn, the statistics merged as the kernel does,
and the loss terms and gradient compared with a float64 two-pass oracle, for
every dtype, layout, input combination, alignment and -inf masked classes.
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
def test_row_math_matches_float64_oracle(tmp_path):
    binary = tmp_path / "test_row_math_host"
    kernels = os.path.join(ROOT, "kernels")
    subprocess.run(
        [NVCC, "-std=c++17", "-O2", "-I", kernels, "-I", os.path.join(kernels, "tests"),
         os.path.join(kernels, "tests", "test_row_math_host.cu"), "-o", str(binary)],
        check=True, capture_output=True, text=True,
    )
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    failed = [line for line in result.stdout.splitlines() if not line.startswith("ok")]
    assert result.returncode == 0, "\n".join(failed[:40])
    assert "all host cases passed" in result.stdout
