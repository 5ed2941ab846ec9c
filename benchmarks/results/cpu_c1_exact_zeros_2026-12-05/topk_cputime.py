"""Thread CPU time of the cpu op with a top-k teacher, one torch thread (the top-k twin of
benchmarks/cpu_kernel_cputime.py, which times the dense form only): minimum and median over
repeats, per shape, dtype and mode.

    PYTHONPATH=. python benchmarks/results/cpu_c1_exact_zeros_2026-12-05/topk_cputime.py NAME.json
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import smskd_fast
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.provenance import git_commit

SHAPES = ((4096, 1000, 16), (1024, 32000, 64))  # n, C, k
DTYPES = (torch.float32, torch.bfloat16)
TEMPERATURE = 2.5


def main(out: str, repeats: int = 15) -> None:
    torch.set_num_threads(1)
    rows = []
    for n, c, k in SHAPES:
        generator = torch.Generator().manual_seed(0)
        student, teacher, reference = (torch.randn(n, c, generator=generator) * 3 for _ in range(3))
        target = torch.randint(0, c, (n,), generator=generator)
        topk = TopKTeacher.from_logits(teacher, target, k, TEMPERATURE)
        for dtype in DTYPES:
            s, r = student.to(dtype), reference.to(dtype)
            for mode in ("forward", "forward+backward"):
                leaf = s.detach().requires_grad_(mode != "forward")

                def step() -> None:
                    out = smskd_fast.smskd_loss(leaf, target, None, r, teacher_topk=topk, temperature=TEMPERATURE,
                                                backend="cpu")
                    if mode != "forward":
                        torch.autograd.grad(out.loss, leaf)
                step()
                seconds = []
                for _ in range(repeats):
                    start = time.thread_time()
                    step()
                    seconds.append(time.thread_time() - start)
                row = {"n": n, "c": c, "k": k, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
                       "min_ms": min(seconds) * 1e3, "median_ms": statistics.median(seconds) * 1e3}
                rows.append(row)
                print(f"topk {n}x{c} k={k} {row['dtype']} {mode:16} {row['min_ms']:9.2f} ms "
                      f"(median {row['median_ms']:.2f})", file=sys.stderr, flush=True)
    with open(out, "w") as f:
        json.dump({"commit": git_commit(), "temperature": TEMPERATURE, "measurements": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
