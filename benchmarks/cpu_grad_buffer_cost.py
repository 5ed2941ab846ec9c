"""Where the CPU op's forward+gradient time goes at a large vocabulary: the two sweeps, and
the first touch of the freshly allocated N x C gradient buffer.

Single-threaded (torch.set_num_threads(1)) so that the numbers do not depend on how
the machine's cores are shared. Run once as is and once with THP_MEM_ALLOC_ENABLE=1
(PyTorch then asks for transparent huge pages for large CPU tensors):

    PYTHONPATH=. python benchmarks/cpu_grad_buffer_cost.py
    THP_MEM_ALLOC_ENABLE=1 PYTHONPATH=. python benchmarks/cpu_grad_buffer_cost.py
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch

from smskd_fast.bench import harness as benchmarking
from smskd_fast.ops.extension import require_extension

require_extension()
OP = torch.ops.smskd_fast.smskd_loss_rows


def min_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1024x32000")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    n, c = (int(v) for v in args.shape.split("x"))
    torch.set_num_threads(1)
    s, y, t, r = benchmarking.make_inputs(n, c, torch.float32)

    def op(compute_grad: bool, temperature: float = 4.0):
        return lambda: OP(s, y, t, r, temperature, 1.0, 1.0, 1.0, "inverse_tcp", -100, compute_grad)

    touched = torch.empty(n, c)
    touched.fill_(0.0)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, {n}x{c} float32, 1 thread, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')!r}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()}")
    rows = [
        ("op forward only (T=4)", op(False)),
        ("op forward + gradient (T=4)", op(True)),
        ("op forward only (T=2.5, no integer power)", op(False, 2.5)),
        ("op forward + gradient (T=2.5)", op(True, 2.5)),
        ("torch.empty(N, C).fill_(0): new buffer, first touch", lambda: torch.empty(n, c).fill_(0.0)),
        ("fill_(0) of an already touched buffer", lambda: touched.fill_(0.0)),
    ]
    for name, fn in rows:
        print(f"{name:55} {min_ms(fn, args.repeats):8.1f} ms (min of {args.repeats})")


if __name__ == "__main__":
    main()
