"""Host cost per call of the loss's forward + backward, at a shape whose kernels take no time.

On a GPU, rows of C = 100 or 1000 classes cost the device microseconds: a call then takes as
long as the host needs to issue it (Python, argument checks, autograd, one dispatch and launch
per ATen operation). Issue 17's targets at those shapes (>= 1.2x torch.compile) are about this
cost, and it can be measured without a GPU: the Python and dispatch layers are the same on
every device. Two figures per implementation, side by side in one run:
  us/call   wall time of one forward + backward (median over batches of --calls calls;
            on CUDA the batch ends with a synchronisation; the implementations' batches
            interleaved, one of each per round)
  ops/call  operations dispatched per call below autograd, views excluded: each is a kernel
            launch on a GPU (our fused op counts as one, although with reduction "mean" it
            issues from C++ the mean's count and the sums of its outputs too: on CUDA 7
            launches for the op, 9 for the whole fwd+bwd call, csrc/reduction_arg.h; Triton
            kernels launched from Python, e.g. backward's scale_rows on CUDA, are not ATen
            operations and are not counted; the counter is a dispatch mode, so the Triton backend's
            call is counted through its op, as one, like the compiled ops, where its plain eager
            calls run the op's body and its ATen operations one by one;
            benchmarks/gpu/kernel_breakdown.py counts a GPU's kernels per call)
Implementations: smskd_fast with each backend available on the device (on CUDA the Triton backend also
"through the op", its path before its plain eager calls ran the op's body: the ratio is that change's
saving, benchmarks/triton_host_overhead.py measures it without a GPU), the eager PyTorch
composition and torch.compile of it (benchmarks/gpu/bench_grid.py's; its ops are Inductor's
and are not counted).

  python benchmarks/host_overhead.py --out benchmarks/results/host_overhead_cpu
  python benchmarks/host_overhead.py --device cuda --out $OUT/host_overhead
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from smskd_fast.backends.registry import available_backends  # noqa: E402
from smskd_fast.bench import harness as benchmarking  # noqa: E402
from smskd_fast.ops import registration  # noqa: E402
from bench_grid import (TEMPERATURE, eager_smskd, make_inputs, smskd_fast_loss,  # noqa: E402
                        with_attribute_during_each_call)


class OperationCounter(TorchDispatchMode):
    """Counts the operations dispatched below autograd, views and metadata-only operations excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.names: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in METADATA_ONLY:
            self.names.append(func.name())
        return func(*args, **(kwargs or {}))


METADATA_ONLY = {"detach", "lift_fresh", "set_"}  # no kernel behind them


def through_the_op(loss_fn: Callable) -> Callable:
    """loss_fn with its plain eager calls sent through the op, not its body (registration.plain_eager_call
    answering no): the Triton backend's path before stop 28, to be measured beside it."""
    return with_attribute_during_each_call(loss_fn, registration, "plain_eager_call", lambda arguments: False)


def implementations(device: str) -> Dict[str, Callable]:
    """name -> loss(student, target, teacher, reference), for what runs on this device."""
    status = available_backends()
    chosen = {f"smskd_fast[{backend}]": smskd_fast_loss(backend)
              for backend in (("cpu",) if device == "cpu" else ("cuda", "triton")) if status[backend].available}
    if "smskd_fast[triton]" in chosen:
        chosen["smskd_fast[triton] through the op"] = through_the_op(chosen["smskd_fast[triton]"])
    chosen["eager"] = eager_smskd
    chosen["compiled"] = torch.compile(eager_smskd, dynamic=False)
    return chosen


def synchronize(device: str) -> None:
    """Waits for the device's queued work (CUDA); nothing on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


def per_call_us(step: Callable[[], None], device: str, calls: int, batches: int) -> Dict[str, float]:
    """interleaved_per_call_us of one step (benchmarks/gpu/kernel_breakdown.py's wall time)."""
    return interleaved_per_call_us({"step": step}, device, calls, batches)["step"]


def interleaved_per_call_us(steps: Dict[str, Callable[[], None]], device: str, calls: int,
                            batches: int) -> Dict[str, Dict[str, float]]:
    """name -> median and spread of the wall time of one call of its step, in microseconds, over batches
    of calls (each ended by a synchronisation on CUDA), after a warm-up. The batches are interleaved,
    each round one batch of every step in turn, so that a change of the machine's load hits all alike."""
    for step in steps.values():
        for _ in range(max(calls // 4, 10)):
            step()
    synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(batches):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: {"us_per_call": statistics.median(values), "us_min": min(values), "us_max": max(values)}
            for name, values in times.items()}


def loss_step(loss_fn: Callable, n: int, c: int, dtype: torch.dtype, device: str) -> Callable[[], None]:
    """One forward + backward of loss_fn on inputs of its own, the gradient reset before it."""
    student, target, teacher, reference = make_inputs(n, c, dtype, device)
    student.requires_grad_()

    def step():
        student.grad = None
        loss_fn(student, target, teacher, reference).backward()
    return step


def measure(implementations: Dict[str, Callable], n: int, c: int, dtype: torch.dtype, device: str,
            calls: int, batches: int) -> List[Dict]:
    """One row per implementation: its time per call (batches interleaved) and, but for the compiled one,
    the operations one call dispatches."""
    steps = {name: loss_step(loss_fn, n, c, dtype, device) for name, loss_fn in implementations.items()}
    timing = interleaved_per_call_us(steps, device, calls, batches)
    rows = []
    for name, step in steps.items():
        row = {"impl": name, **timing[name]}
        if name != "compiled":
            counter = OperationCounter()
            with counter:
                step()
            row["ops_per_call"] = len(counter.names)
            row["ops"] = counter.names
        rows.append(row)
    return rows


def table(rows: List[Dict], baseline: str) -> str:
    base = next((row["us_per_call"] for row in rows if row["impl"] == baseline), float("nan"))
    lines = ["| implementation | us/call (median) | min-max | vs " + baseline + " | ops/call |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['impl']} | {row['us_per_call']:.1f} | {row['us_min']:.1f}-{row['us_max']:.1f} | "
                     f"{row['us_per_call'] / base:.2f}x | {row.get('ops_per_call', '-')} |")
    return "\n".join(lines)


def write_outputs(out: Path, text: str, data: Dict) -> None:
    """OUT.md (the printed table) and OUT.json (the raw figures): new files (existing ones are refused),
    written all or none."""
    json_path, md_path = benchmarking.result_paths(out)
    benchmarking.write_files_new({md_path: text, json_path: json.dumps(data, indent=1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rows", type=benchmarking.positive_int, default=8)
    parser.add_argument("--classes", type=benchmarking.positive_int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--calls", type=benchmarking.positive_int, default=200, help="calls per timed batch")
    parser.add_argument("--batches", type=benchmarking.positive_int, default=15)
    parser.add_argument("--threads", type=benchmarking.positive_int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", type=Path, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    benchmarking.refuse_existing_outputs(parser, args.out)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = measure(implementations(args.device), args.rows, args.classes, dtype, args.device, args.calls,
                   args.batches)
    for row in rows:
        print(json.dumps({key: value for key, value in row.items() if key != "ops"}), flush=True)
    where = benchmarking.environment(args.device)
    header = (f"host cost per forward+backward, {args.rows} x {args.classes} {args.dtype}, T = {TEMPERATURE}, "
              f"device {args.device} ({where['device_name']}), torch {where['torch']}, triton {where['triton']}, "
              f"threads {args.threads}, {where['date']}, commit {where['commit']}\n"
              f"command: python {' '.join(sys.argv)}")
    text = header + "\n\n" + table(rows, "compiled") + "\n"
    print(text)
    for row in rows:
        if "ops" in row:
            print(f"{row['impl']}: {' '.join(row['ops'])}")
    if args.out:
        write_outputs(args.out, text, {"header": header, "environment": where, "rows": rows})


if __name__ == "__main__":
    main()
