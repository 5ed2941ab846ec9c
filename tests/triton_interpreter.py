"""Where the Triton tests run, and the re-run of a test file under Triton's CPU interpreter.

With a CUDA device (and triton), the kernels run in the test process on CUDA
tensors. Without one, Triton's interpreter runs them on CPU tensors, but only
when TRITON_INTERPRET=1 is set before triton is first imported, and in a pytest
session smskd_fast (which imports triton) is already imported by then. So each
Triton test file has a test that calls run_under_interpreter(__file__): it re-runs
that file in a fresh Python with TRITON_INTERPRET=1, where the cases run with
small shapes; in this process they skip (needs_kernels) with a reason naming it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smskd_fast
from smskd_fast.backends.triton import backend as triton_backend

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = triton_backend.kernels_interpreted()
ON_GPU = not INTERPRETED and bool(smskd_fast.available_backends()["triton"]) and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

needs_kernels = pytest.mark.skipif(
    not (INTERPRETED or ON_GPU),
    reason="no CUDA device here: these cases run on CPU tensors under TRITON_INTERPRET=1 in a "
    "subprocess, see test_cases_under_the_interpreter",
)
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device and triton")


def reruns_under_interpreter(test):
    """Marks the test that re-runs its file: it runs only where the cases did not run in this process."""
    test = pytest.mark.skipif(INTERPRETED or ON_GPU, reason="the cases run directly in this process")(test)
    return pytest.mark.skipif(not hasattr(torch.ops.smskd_fast, "smskd_loss_rows_triton"),
                              reason="triton is not importable, so there are no kernels to interpret")(test)


def run_under_interpreter(test_file: str, *pytest_args: str) -> None:
    """Runs test_file (a path or node id, with pytest_args) under TRITON_INTERPRET=1 in a fresh interpreter;
    fails if any case fails."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, *pytest_args, "-q", "-p", "no:cacheprovider", "-W",
         "ignore::RuntimeWarning"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    summary = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, summary
    # "N failed", not the "failed" inside "xfailed" (a strict xfail that passes is a failure: returncode)
    assert " passed" in result.stdout and not re.search(r"\b\d+ failed\b", result.stdout), summary
