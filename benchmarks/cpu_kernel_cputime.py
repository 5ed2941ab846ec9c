"""CPU time of our CPU op alone, one thread: a speed comparison that survives a loaded machine.

cpu_loss_table.py times wall-clock with every core, which other processes on a shared
machine disturb by far more than a compiler-flag change could. Here torch runs one
thread, so the op runs in the calling thread and time.thread_time() counts only its own
work (cache contention still adds noise; the minimum over repeats is the figure to read).
Same loss, shapes and dtypes as cpu_loss_table.py; the JSON has its layout, so
cpu_build_summary.py reads both.

    PYTHONPATH=. python benchmarks/cpu_kernel_cputime.py --out-dir DIR --name NAME [--repeats 15]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

from smskd_fast.bench import harness as benchmarking
from smskd_fast.provenance import git_commit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_loss_table import positive_int, refuse_existing, write_new_files  # noqa: E402


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--repeats", type=positive_int, default=15)
    args = parser.parse_args()
    path = os.path.join(args.out_dir, args.name + ".json")
    refuse_existing([path])  # at once, not after the run
    torch.set_num_threads(1)
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {"date": now.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(),
            "clock": "time.thread_time, 1 torch thread",
            "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                        "python": platform.python_version(), "load_average_at_start": os.getloadavg()},
            "command": " ".join(sys.argv)}
    measurements = []
    for n, c in benchmarking.SHAPES:
        for dtype in benchmarking.DTYPES:
            inputs = benchmarking.make_inputs(n, c, dtype)
            for mode in benchmarking.MODES:
                step = benchmarking.make_step("smskd_fast", mode, inputs, backend="cpu")
                step()  # warm-up
                seconds = []
                for _ in range(args.repeats):
                    start = time.thread_time()
                    step()
                    seconds.append(time.thread_time() - start)
                m = {"n": n, "c": c, "dtype": str(dtype).replace("torch.", ""), "mode": mode, "method": "smskd_fast",
                     "median_ms": statistics.median(seconds) * 1e3, "min_ms": min(seconds) * 1e3}
                measurements.append(m)
                print(f"{n}x{c} {m['dtype']} {mode:16} {m['min_ms']:9.2f} ms (median {m['median_ms']:.2f})",
                      file=sys.stderr, flush=True)
    meta["load_average_at_end"] = os.getloadavg()
    write_new_files({path: json.dumps({"meta": meta, "measurements": measurements}, indent=1)})


if __name__ == "__main__":
    main()
