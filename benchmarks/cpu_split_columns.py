"""One long row (N=1) on 1 and on 2 threads: the column split's speed-up.

    PYTHONPATH=. python benchmarks/cpu_split_columns.py
"""
from __future__ import annotations

import datetime
import os
import time

import torch

from smskd_fast.bench import harness as benchmarking
from smskd_fast.ops.extension import require_extension

require_extension()
OP = torch.ops.smskd_fast.smskd_loss_rows


def main() -> None:
    c = 1 << 20
    s, y, t, r = benchmarking.make_inputs(1, c, torch.float32)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, 1x{c} float32, forward+gradient, "
          f"load average {os.getloadavg()}")
    for threads in (1, 2):
        torch.set_num_threads(threads)

        def step():
            return OP(s, y, t, r, 4.0, 1.0, 1.0, 1.0, "inverse_tcp", -100, True)

        step()
        best = float("inf")
        for _ in range(15):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
        print(f"{threads} thread(s): min {best * 1e3:.2f} ms over 15 calls")


if __name__ == "__main__":
    main()
