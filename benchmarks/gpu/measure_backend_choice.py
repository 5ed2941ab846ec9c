"""Measures the cuda and triton backends per (dtype, C) and writes backend="auto"'s table.

For each dtype and number of classes C, times forward + backward of
smskd_fast.smskd_loss (target, teacher and reference logits; about 2**26 logits
per input) with each available GPU backend, and records the faster one per
(GPU name, dtype, C) in the table that smskd_fast/backends/gpu_choice.py reads.

    python benchmarks/gpu/measure_backend_choice.py --out-dir $OUT

Writes <out-dir>/backend_choice.json (every timing, device, versions, commit,
date) and <out-dir>/gpu_choice_table.json (the table: commit it as
smskd_fast/backends/gpu_choice_table.json; measurements of other GPUs already
there are kept, and so are this GPU's entries that this run does not decide). Needs a CUDA device,
except with --from-bench FILE, which derives the table from the cuda and triton rows of a results
file of benchmarks/gpu/speed_of_light.py (speed_of_light.json) or bench_grid.py (bench_results.json)
instead of measuring: only the (dtype, C) where both backends were timed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import smskd_fast  # noqa: E402
from smskd_fast.backends import gpu_choice  # noqa: E402

CLASSES = (128, 512, 1024, 2048, 4096, 8192, 16384, 32000, 65536, 131072, 262144)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def time_ms(step, repeats: int = 5, iters: int = 10) -> float:
    """Median over repeats of the mean time of iters calls, by CUDA events."""
    for _ in range(3):
        step()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / iters)
    return statistics.median(samples)


def measure(backend: str, dtype: torch.dtype, num_classes: int, elements: int) -> dict:
    rows = max(1, elements // num_classes)
    g = torch.Generator(device="cuda").manual_seed(0)
    student = (3 * torch.randn(rows, num_classes, device="cuda", generator=g)).to(dtype).requires_grad_(True)
    teacher = (3 * torch.randn(rows, num_classes, device="cuda", generator=g)).to(dtype)
    reference = (3 * torch.randn(rows, num_classes, device="cuda", generator=g)).to(dtype)
    target = torch.randint(0, num_classes, (rows,), device="cuda", generator=g)

    def step():
        student.grad = None
        smskd_fast.smskd_loss(student, target, teacher, reference, backend=backend).loss.backward()

    ms = time_ms(step)
    floor_bytes = rows * num_classes * 4 * student.element_size()  # 3 reads + 1 gradient write
    return {"backend": backend, "dtype": str(dtype).replace("torch.", ""), "C": num_classes, "N": rows,
            "ms": round(ms, 5), "floor_GBps": round(floor_bytes / ms / 1e6, 1)}


def copy_bandwidth_gbps(elements: int) -> float:
    """Device-to-device copy, counting bytes read and written."""
    src = torch.empty(elements * 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--classes", default=",".join(map(str, CLASSES)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--elements", type=int, default=2**26, help="logits per input tensor")
    parser.add_argument("--from-bench", help="bench_grid.py JSON to take the timings from (no GPU needed)")
    args = parser.parse_args()
    if args.from_bench:
        return table_from_bench(args.from_bench, args.out_dir)
    if not torch.cuda.is_available():
        print("measure_backend_choice: needs a CUDA device", file=sys.stderr)
        return 2

    status = smskd_fast.available_backends()
    backends = [name for name in gpu_choice.GPU_BACKENDS if name in status and status[name]]
    print("backends:", {name: (bool(status[name]), status[name].reason) for name in status})
    device = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps(args.elements)
    print(f"device: {device}; copy bandwidth {copy_gbps:.0f} GB/s")
    results = []
    winners: dict = {}
    print(f"{'dtype':9s} {'C':>7s} " + " ".join(f"{b + ' ms':>11s}" for b in backends) + "  winner   cuda/triton")
    for dtype_name in args.dtypes.split(","):
        for num_classes in map(int, args.classes.split(",")):
            timings = {}
            for backend in backends:
                try:
                    row = measure(backend, DTYPES[dtype_name], num_classes, args.elements)
                except Exception as error:  # a failing backend loses, and the reason is recorded
                    row = {"backend": backend, "dtype": dtype_name, "C": num_classes, "error": repr(error)[:500]}
                results.append(row)
                if "ms" in row:
                    timings[backend] = row["ms"]
            if not timings:
                continue
            winner = gpu_choice.pick_winner(timings)
            winners.setdefault(dtype_name, {})[str(num_classes)] = winner
            ratio = (f"{timings['cuda'] / timings['triton']:.3f}" if {"cuda", "triton"} <= timings.keys() else "-")
            cells = " ".join(f"{timings.get(b, float('nan')):11.4f}" for b in backends)
            print(f"{dtype_name:9s} {num_classes:7d} {cells}  {winner:8s} {ratio}", flush=True)

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    meta = {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "torch": torch.__version__, "copy_GBps": round(copy_gbps, 1),
            "command": " ".join(sys.argv), "elements_per_input": args.elements}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "backend_choice.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    write_table(args.out_dir, device, winners, meta)
    print(f"written: {args.out_dir}/backend_choice.json")
    return 0


def write_table(out_dir: str, device: str, winners: dict, meta: dict) -> None:
    """<out_dir>/gpu_choice_table.json: the shipped table with this run's winners merged into the device's
    (a (dtype, C) this run did not decide keeps its earlier winner; the earlier run's date and commit are kept
    in meta["earlier"])."""
    table = {"devices": {}, "measured": {}}
    if os.path.exists(gpu_choice.TABLE_PATH):
        with open(gpu_choice.TABLE_PATH) as f:
            table.update(json.load(f))
    merged = table["devices"].setdefault(device, {})
    for dtype, by_c in winners.items():
        merged.setdefault(dtype, {}).update(by_c)
    earlier = table["measured"].get(device)
    if earlier:
        meta = {**meta, "earlier": {key: earlier.get(key) for key in ("date", "commit", "source")}}
    table["measured"][device] = meta
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_choice_table.json"), "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"written: {out_dir}/gpu_choice_table.json")


def bench_timings(rows: list) -> dict:
    """{dtype: {C: {backend: ms}}} for each (dtype, C) where every GPU backend was tried at every N: ms summed
    over the N (bench_grid's grid has several), a backend that failed (an error row) at inf so that it loses.
    A (dtype, C) that a backend did not reach (a deadline, not installed) is left out: nothing was compared."""
    tried: dict = {}
    for row in rows:
        if row["impl"] in gpu_choice.GPU_BACKENDS:
            ms = row.get("ms", math.inf if "error" in row else None)
            if ms is not None:
                tried.setdefault((row["dtype"], str(row["C"])), {}).setdefault(row["N"], {})[row["impl"]] = ms
    timings: dict = {}
    for (dtype, c), by_n in tried.items():
        if all(len(by_backend) == len(gpu_choice.GPU_BACKENDS) for by_backend in by_n.values()):
            totals = {b: sum(by_backend[b] for by_backend in by_n.values()) for b in gpu_choice.GPU_BACKENDS}
            if any(math.isfinite(ms) for ms in totals.values()):
                timings.setdefault(dtype, {})[c] = totals
    return timings


def table_from_bench(path: str, out_dir: str) -> int:
    """The choice table from the cuda and triton timings of a speed_of_light.py or bench_grid.py results file."""
    with open(path) as f:
        bench = json.load(f)
    timings = bench_timings(bench["rows"] if "rows" in bench else bench["grid"])
    if not timings:
        print(f"measure_backend_choice: {path} has no (dtype, C) with both GPU backends timed; nothing written",
              file=sys.stderr)
        return 1
    winners = {dtype: {c: gpu_choice.pick_winner(t) for c, t in by_c.items()} for dtype, by_c in timings.items()}
    for dtype, by_c in sorted(timings.items()):
        for c, t in sorted(by_c.items(), key=lambda item: int(item[0])):
            print(f"{dtype:9s} {c:>7s} " + " ".join(f"{b} {ms:.4f} ms" for b, ms in sorted(t.items()))
                  + f"  -> {winners[dtype][c]}")
    environment = bench.get("environment", {})
    meta = {"device": bench["device"], "torch": bench.get("torch"), "copy_GBps": bench.get("copy_GBps"),
            "commit": environment.get("commit"), "triton": environment.get("triton"),
            "command": " ".join(sys.argv), "source": os.path.basename(path),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_table(out_dir, bench["device"], winners, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
