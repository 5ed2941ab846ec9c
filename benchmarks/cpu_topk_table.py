"""CPU top-k teacher benchmark: the C++ top-k kernel, the reference backend's top-k form,
and the dense C++ kernel on the same rows.

Every method computes the default SMSKD loss per row (CE + KD + inverse-TCP-weighted
reference KL, T = 4) for the same student, target and reference; the teacher is in
the top-k form (k kept classes) except for the dense kernel, which reads the full
teacher row. Methods are called at the row level, without the public API's
validation: the C++ operators directly (forward: compute_grad=False; forward+backward:
compute_grad=True, which writes d loss_i / d s_i), the reference backend's rows()
with autograd for the gradient. Rounds are interleaved (each round runs every method
once). Writes benchmarks/results/<name>.json and .md.

    PYTHONPATH=. python benchmarks/cpu_topk_table.py --shapes 4096x1000x10 --dtypes float32 --repeats 3

To compare the kernel of two commits, run this script alternately in two built trees
(each with PYTHONPATH at its own root), as benchmarks/results/cpu_topk_far_rest_2026-12-06/run.sh
does: the kernel's headers change with it, so one commit's .cpp cannot be built beside
another's. (An earlier --before COMMIT built only that file, with this tree's headers.)

On a loaded machine, --threads 1 gives steadier figures: a parallel region waits for
its slowest thread, and a thread may wait a whole time slice for a core.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

import smskd_fast  # noqa: F401  (loads the smskd_fast operators)
from smskd_fast.bench import harness as benchmarking
from smskd_fast.ops.extension import require_extension
from smskd_fast.provenance import git_commit
from smskd_fast.backends.base import LossOptions, RowInputs
from smskd_fast.backends.reference import ReferenceBackend
from smskd_fast.backends.topk import TopKTeacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from cpu_loss_table import (DTYPE_NAMES, machine, parse_dims, positive_int, refuse_existing,  # noqa: E402
                            write_new_files)

SHAPES = ((4096, 1000, 10), (1024, 32000, 64))
OPTIONS = LossOptions(temperature=benchmarking.TEMPERATURE, ce_weight=1.0, kd_weight=1.0, ref_weight=1.0,
                      weighting="inverse_tcp")


def make_inputs(n: int, c: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student, teacher, reference = (torch.randn(n, c, generator=g) * 3 for _ in range(3))
    target = torch.randint(0, c, (n,), generator=g)
    topk = TopKTeacher.from_logits(teacher, target, k, OPTIONS.temperature)  # float32, as a cache gives it
    return student.to(dtype), target, teacher.to(dtype), reference.to(dtype), topk


def scalars(options: LossOptions):
    return (options.temperature, options.ce_weight, options.kd_weight, options.ref_weight, options.weighting,
            options.ignore_index)


def make_steps(inputs, mode: str, methods):
    student, target, teacher, reference, topk = inputs
    grad = mode == "forward+backward"
    topk_args = (student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
                 topk.log_sum_exp_at_temperature, reference, *scalars(OPTIONS), grad)
    steps = {}
    if "after" in methods:
        steps["after"] = lambda: torch.ops.smskd_fast.smskd_loss_rows_topk(*topk_args)
    if "reference" in methods:
        def reference_rows():
            s = student.detach().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                out = ReferenceBackend().rows(RowInputs(s, target, None, reference, topk), OPTIONS)
                return torch.autograd.grad(out.loss.sum(), s) if grad else out.loss
        steps["reference"] = reference_rows
    if "dense" in methods:
        steps["dense"] = lambda: torch.ops.smskd_fast.smskd_loss_rows(student, target, teacher, reference,
                                                                     *scalars(OPTIONS), grad)
    return steps


def interleaved_wall_and_cpu_seconds(steps, repeats: int, warmup: int = 1):
    """Like benchmarking.interleaved_seconds, also recording this process's CPU time per call:
    on a machine shared with other jobs, the CPU time of a one-thread run counts only the
    time the call actually ran, not the time it waited for a core."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            step()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return wall, cpu


def markdown(meta: dict, rows: list, methods) -> str:
    ms_cols = " | ".join(f"{m} ms" for m in methods)
    ratio_cols = [m for m in methods if m != "after"]
    lines = [
        "# CPU top-k teacher kernel, the reference backend's top-k form, the dense kernel",
        "",
        f"- date (UTC): {meta['date']}",
        f"- commit: {meta['commit']}",
        f"- device: {meta['machine']['cpu']}, {meta['machine']['logical_cpus']} logical CPUs, "
        f"{meta['machine']['torch_threads']} torch threads, ATen capability {meta['machine']['aten_cpu_capability']}",
        f"- torch {meta['machine']['torch']}, Python {meta['machine']['python']}",
        f"- load average at start / end: {meta['machine']['load_average_at_start']} / {meta['load_average_at_end']}",
        f"- command: `{meta['command']}`",
        f"- loss: default SMSKD per row (CE + KD + inverse-TCP-weighted reference KL, T={OPTIONS.temperature}); "
        "top-k teacher (float32 values) for after (the kernel) and reference, the full teacher row for dense; "
        "row-level calls (no public-API validation); forward+backward = the per-row gradient "
        "(C++: compute_grad=True; reference: autograd)",
        "- wall times: median (min) over the rounds, methods interleaved; ratios: other / after, "
        "median-based (min-based)",
        "",
        f"| N x C, k | dtype | mode | {ms_cols} | " + " | ".join(f"{m} / after" for m in ratio_cols) + " |",
        "|---|---|---|" + "---:|" * (len(methods) + len(ratio_cols)),
    ]
    for r in rows:
        times = " | ".join(f"{r[m]['median_ms']:.2f} ({r[m]['min_ms']:.2f})" for m in methods)
        ratios = " | ".join(f"{r[m]['median_ms'] / r['after']['median_ms']:.2f} "
                            f"({r[m]['min_ms'] / r['after']['min_ms']:.2f})" for m in ratio_cols)
        lines.append(f"| {r['n']} x {r['c']}, {r['k']} | {r['dtype']} | {r['mode']} | {times} | {ratios} |")
    lines += [
        "",
        "Process CPU time per call, median (the time a call ran, without waiting for a core; with more than "
        "one thread it sums the threads, spin-waiting included):",
        "",
        "| N x C, k | dtype | mode | " + " | ".join(f"{m} cpu ms" for m in methods) + " | "
        + " | ".join(f"{m} / after" for m in ratio_cols) + " |",
        "|---|---|---|" + "---:|" * (len(methods) + len(ratio_cols)),
    ]
    for r in rows:
        times = " | ".join(f"{r[m]['cpu_median_ms']:.2f}" for m in methods)
        ratios = " | ".join(f"{r[m]['cpu_median_ms'] / r['after']['cpu_median_ms']:.2f}" for m in ratio_cols)
        lines.append(f"| {r['n']} x {r['c']}, {r['k']} | {r['dtype']} | {r['mode']} | {times} | {ratios} |")
    return "\n".join(lines) + "\n"


def parse_shape(text: str):
    """NxCxK, all positive, K <= C."""
    n, c, k = parse_dims(text, "NCK")
    if k > c:
        raise argparse.ArgumentTypeError(f"K (kept classes) must be at most C, got {text!r}")
    return n, c, k


def main(argv=None) -> None:
    require_extension()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(SHAPES), help="NxCxK")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=DTYPE_NAMES)
    parser.add_argument("--modes", nargs="+", default=list(benchmarking.MODES), choices=benchmarking.MODES)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--name", default=None, help="file name stem (default cpu_topk_<UTC stamp>)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = ["after", "reference", "dense"]
    now = datetime.datetime.now(datetime.timezone.utc)
    stem = os.path.join(args.out_dir, args.name or f"cpu_topk_{now.strftime('%Y%m%d-%H%M%S')}")
    refuse_existing([stem + ".json", stem + ".md"])  # at once, not after the run
    meta = {"date": now.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(),
            "machine": machine(),
            "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + (argv if argv is not None else sys.argv[1:]))}
    rows = []
    for n, c, k in args.shapes:
        for dtype_name in args.dtypes:
            inputs = make_inputs(n, c, k, getattr(torch, dtype_name))
            for mode in args.modes:
                wall, cpu = interleaved_wall_and_cpu_seconds(make_steps(inputs, mode, methods), args.repeats)
                row = {"n": n, "c": c, "k": k, "dtype": dtype_name, "mode": mode}
                for method in methods:
                    row[method] = {"median_ms": 1e3 * statistics.median(wall[method]),
                                   "min_ms": 1e3 * min(wall[method]), "all_ms": [1e3 * s for s in wall[method]],
                                   "cpu_median_ms": 1e3 * statistics.median(cpu[method]),
                                   "cpu_all_ms": [1e3 * s for s in cpu[method]]}
                print(f"{n}x{c} k={k} {dtype_name} {mode:16} " + "  ".join(
                    f"{m} {row[m]['median_ms']:.2f} ms (cpu {row[m]['cpu_median_ms']:.2f})" for m in methods),
                    file=sys.stderr, flush=True)
                rows.append(row)
    meta["load_average_at_end"] = os.getloadavg()
    table = markdown(meta, rows, methods)
    write_new_files({stem + ".json": json.dumps({"meta": meta, "rows": rows}, indent=1), stem + ".md": table})
    print(table)


if __name__ == "__main__":
    main()
