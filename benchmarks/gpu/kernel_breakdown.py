"""Where a forward+backward call's time goes on the GPU: its kernels' device time against its wall time.

For each implementation (host_overhead.implementations: smskd_fast's backends on the device, the
eager composition, torch.compile of it) and shape (bench_grid's inputs, mean loss, T = 2): the wall time of one
call (median over batches of calls that end with a synchronisation), the device time of the
call's kernels (torch.profiler over a few calls: CUDA kernels, Triton's included, summed; not the device-side
copies of user annotations, such as the one Inductor puts around each compiled graph's kernels), the
kernels per call and the three longest. device/wall near 1: the kernels bound the call, and the
main kernel's share says what it reaches alone; well below 1: the host does (issue 17's C = 100
and 1000 rows). Writes kernel_breakdown.json to --out and prints the table (run_all.sh keeps it
in its log).

  python benchmarks/gpu/kernel_breakdown.py --out DIR [--deadline 40]
  python benchmarks/gpu/kernel_breakdown.py --dry-run --out /tmp/kb   # CPU: top-level operators stand for kernels
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import bench_grid  # noqa: E402  (first: it sets TRITON_INTERPRET for --dry-run before triton loads)
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(bench_grid.ROOT / "benchmarks"))
from host_overhead import implementations, per_call_us  # noqa: E402

SHAPES = ((65536, 100, torch.bfloat16), (16384, 1000, torch.bfloat16), (4096, 1000, torch.float32),
          (8192, 32000, torch.bfloat16))
DRY_RUN_SHAPES = ((64, 100, torch.float32),)
PROFILED_CALLS = 5


def kernel_times_ms(step: Callable[[], None], device: str) -> Dict[str, float]:
    """Device ms per call of each kernel name (on the CPU: each top-level operator's wall ms)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_CALLS):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    per_name: Dict[str, float] = defaultdict(float)
    for event in prof.events():
        if device == "cuda":  # kernels; not the CUDA-side copies of annotations (Inductor marks each graph call)
            counted = event.device_type == DeviceType.CUDA and not event.is_user_annotation
        else:
            counted = event.cpu_parent is None and "::" in event.name
        if counted:
            per_name[event.name] += event.time_range.elapsed_us() / 1e3 / PROFILED_CALLS
    return dict(per_name)


def measure(loss_fn: Callable, n: int, c: int, dtype: torch.dtype, device: str) -> Dict:
    student, target, teacher, reference = bench_grid.make_inputs(n, c, dtype, device)
    student.requires_grad_()

    def step():
        student.grad = None
        loss_fn(student, target, teacher, reference).backward()

    wall = per_call_us(step, device, calls=20, batches=5)["us_per_call"] / 1e3
    kernels = kernel_times_ms(step, device)
    busy = sum(kernels.values())
    longest = sorted(kernels.items(), key=lambda item: -item[1])[:3]
    return {"wall_ms": wall, "device_ms": busy, "device_over_wall": busy / wall, "kernels": len(kernels),
            "longest": [(name[:70], ms) for name, ms in longest], "all": kernels}


def markdown(results: Dict) -> str:
    lines = [f"# Kernel time against call time ({results['device']}, {results['environment']['date']}, "
             f"commit {results['environment']['commit']})", "", f"`{results['command']}`", "",
             "| impl | N x C | dtype | wall ms/call | kernels' ms/call | kernels/wall | kernel names | longest (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        shape = f"{row['N']} x {row['C']}"
        if "error" in row:
            lines.append(f"| {row['impl']} | {shape} | {row['dtype']} | {row['error']} | | | | |")
            continue
        longest = "; ".join(f"{name} {ms:.3f}" for name, ms in row["longest"])
        lines.append(f"| {row['impl']} | {shape} | {row['dtype']} | {row['wall_ms']:.3f} | {row['device_ms']:.3f} "
                     f"| {row['device_over_wall']:.2f} | {row['kernels']} | {longest} |")
    if results["skipped"]:
        lines += ["", "Skipped: " + "; ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def write(results: Dict, out) -> None:
    (out / "kernel_breakdown.json").write_text(json.dumps(results, indent=1))


def main(argv: Optional[Sequence[str]] = None) -> int:
    start = time.monotonic()
    started = bench_grid.start_run(__doc__.splitlines()[0], 45.0, argv)
    if started is None:
        return 2
    args, device, _, results = started
    chosen = implementations(device)
    rows: List[Dict] = results["rows"]
    for n, c, dtype in (SHAPES if device == "cuda" else DRY_RUN_SHAPES):
        for name, loss_fn in chosen.items():
            if time.monotonic() - start > args.deadline:
                results["skipped"].append(f"{name} {dtype} {n}x{c} (deadline)")
                continue
            row = {"impl": name, "N": n, "C": c, "dtype": str(dtype).replace("torch.", "")}
            rows.append(bench_grid.recorded(row, device, lambda: measure(loss_fn, n, c, dtype, device)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "all"}), flush=True)
            write(results, args.out)  # each row as it is measured: a run cut short keeps what it has
    write(results, args.out)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
