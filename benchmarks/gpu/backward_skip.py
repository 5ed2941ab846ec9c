"""What folding the mean's 1/n into the forward gradient saves, measured in one run of one build.

Forward+backward of the mean SMSKD loss (bench_grid's inputs, T = 2) twice per backend, shape
and dtype: with grad_output = 1 (loss.backward(): the kernel's gradient is already d mean / d s,
and backward leaves every row alone) and with grad_output = 0.5 ((0.5 * loss).backward():
backward reads and writes every row once to scale it, the pass that every backward made
before the fold). The difference is that pass; "pass GB/s" is its bytes (N*C read + write)
over its time, to compare with the copy bandwidth. Writes backward_skip.{json,md} to --out.

  python benchmarks/gpu/backward_skip.py --out DIR [--deadline 60]
  python benchmarks/gpu/backward_skip.py --dry-run --out /tmp/skip   # CPU, tiny shapes
"""
from __future__ import annotations

import json
import sys
import time
from typing import Dict, List, Optional, Sequence

import bench_grid  # noqa: E402  (first: it sets TRITON_INTERPRET for --dry-run before triton loads)
import torch  # noqa: E402

import smskd_fast  # noqa: E402

SHAPES = ((8192, 32000), (4096, 128256), (16384, 1000))
DRY_RUN_SHAPES = ((64, 100), (8, 5000))
DTYPES = (torch.bfloat16, torch.float32)
BACKENDS = ("cuda", "triton")
GRAD_OUTPUTS = (1.0, 0.5)


def measure(backend: str, n: int, c: int, dtype: torch.dtype, device: str, timer: bench_grid.Timer) -> Dict:
    """ms of fwd+bwd with grad_output 1 and 0.5, and what the difference says about the saved pass."""
    student, target, teacher, reference = bench_grid.make_inputs(n, c, dtype, device)
    student.requires_grad_()
    loss_fn = bench_grid.smskd_fast_loss(backend)
    row: Dict = {"impl": backend, "N": n, "C": c, "dtype": str(dtype).replace("torch.", "")}
    for grad_output in GRAD_OUTPUTS:
        def step(factor=grad_output):  # the same graph for both: one multiply of the 0-d loss
            (loss_fn(student, target, teacher, reference) * factor).backward()
        row[f"ms_grad_output_{grad_output:g}"] = timer(step, [student])
    one, half = row["ms_grad_output_1"], row["ms_grad_output_0.5"]
    row["ratio_scaled_over_skipped"] = half / one
    pass_ms = half - one
    row["pass_ms"] = pass_ms
    row["pass_GBps"] = 2 * n * c * student.element_size() / (pass_ms * 1e6) if pass_ms > 0 else float("nan")
    return row


def markdown(results: Dict) -> str:
    lines = [f"# Backward with and without the row pass ({results['device']}, {results['environment']['date']}, "
             f"commit {results['environment']['commit']})", "",
             f"`{results['command']}`; copy bandwidth {results['copy_GBps']:.0f} GB/s", "",
             "| backend | N x C | dtype | ms, grad_output 1 (rows untouched) | ms, grad_output 0.5 (rows scaled) "
             "| ratio | pass ms | pass GB/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['impl']} | {row['N']} x {row['C']} | {row['dtype']} | {row['error']} | | | | |")
            continue
        lines.append(f"| {row['impl']} | {row['N']} x {row['C']} | {row['dtype']} | {row['ms_grad_output_1']:.3f} "
                     f"| {row['ms_grad_output_0.5']:.3f} | {row['ratio_scaled_over_skipped']:.3f} "
                     f"| {row['pass_ms']:.3f} | {row['pass_GBps']:.0f} |")
    if results["skipped"]:
        lines += ["", "Skipped: " + "; ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    start = time.monotonic()
    started = bench_grid.start_run(__doc__.splitlines()[0], 60.0, argv)
    if started is None:
        return 2
    args, device, timer, results = started
    available = smskd_fast.available_backends()
    backends: List[str] = [b for b in (BACKENDS if device == "cuda" else ("cpu", "triton")) if available[b]]
    results["skipped"] += [f"{b} ({available[b].reason})" for b in BACKENDS if b not in backends and device == "cuda"]
    for backend in backends:
        for dtype in DTYPES:
            for n, c in (SHAPES if device == "cuda" else DRY_RUN_SHAPES):
                if time.monotonic() - start > args.deadline:
                    results["skipped"].append(f"{backend} {dtype} {n}x{c} (deadline)")
                    continue
                row = {"impl": backend, "N": n, "C": c, "dtype": str(dtype).replace("torch.", "")}
                results["rows"].append(bench_grid.recorded(
                    row, device, lambda: measure(backend, n, c, dtype, device, timer)))
                print(json.dumps(results["rows"][-1]), flush=True)
    (args.out / "backward_skip.json").write_text(json.dumps(results, indent=1))
    (args.out / "backward_skip.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
