"""pytest-benchmark suite of the CPU loss: smskd_fast vs eager and torch.compile'd torch.nn.functional.

One benchmark group per (shape, dtype, mode), so that pytest-benchmark prints the three
methods side by side. The peak memory beyond the inputs goes into extra_info.

    PYTHONPATH=. python -m pytest benchmarks/bench_cpu_loss.py --benchmark-only
    SMSKD_BENCH_SHAPES=4096x1000,1024x32000 SMSKD_BENCH_DTYPES=float32 PYTHONPATH=. \\
        python -m pytest benchmarks/bench_cpu_loss.py --benchmark-only --benchmark-json=out.json
"""
from __future__ import annotations

import os

import pytest
import torch

import smskd_fast
from smskd_fast.bench import harness as benchmarking


def _shapes():
    text = os.environ.get("SMSKD_BENCH_SHAPES")
    if not text:
        return list(benchmarking.SHAPES)
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]


def _dtypes():
    text = os.environ.get("SMSKD_BENCH_DTYPES")
    names = text.split(",") if text else [str(d).replace("torch.", "") for d in benchmarking.DTYPES]
    return [getattr(torch, name) for name in names]


if benchmarking.peak_memory_supported():
    benchmarking.prepare_memory_measurement()

pytestmark = pytest.mark.skipif(not smskd_fast.available_backends()["cpu"].available,
                                reason="the C++ CPU kernel is not built")


@pytest.mark.parametrize("method", benchmarking.METHODS)
@pytest.mark.parametrize("mode", benchmarking.MODES)
@pytest.mark.parametrize("dtype", _dtypes(), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: f"{s[0]}x{s[1]}")
def test_cpu_loss(benchmark, shape, dtype, mode, method):
    n, c = shape
    benchmark.group = f"{n}x{c}-{str(dtype).replace('torch.', '')}-{mode}"
    if method == "torch.compile":
        benchmarking.reset_compilation()  # else the 9th (shape, dtype, mode) reaches dynamo's recompile limit
    step = benchmarking.make_step(method, mode, benchmarking.make_inputs(n, c, dtype), backend="cpu")
    rounds = 3 if n * c >= 1 << 24 else 10
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmarking.peak_memory_supported():
        benchmark.extra_info["peak_extra_mib"] = benchmarking.peak_extra_bytes(step) / 2**20
    benchmark.extra_info["gradient_mib"] = n * c * torch.empty((), dtype=dtype).element_size() / 2**20
