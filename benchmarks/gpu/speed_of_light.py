"""Issue 17's table: the fused loss against the memory floor, torch.compile and Liger, in one run.

For each shape and dtype, forward+backward of the mean SMSKD loss (target, teacher, reference,
T = 2; bench_grid's implementations): eager, torch.compile of the eager composition, the Liger
composition (CE + 2 KL), cuda and triton with the dense teacher, cuda keeping each row on chip
between its sweeps (cuda_rowcache, C > 2048: a candidate, not held to the targets), cuda/triton at T = 2 + 1 float32 ulp
(cuda_anyT, triton_anyT, C >= 32000: the kernels for any T, beside the T = 2 ones; candidates), triton with one running
maximum per column block (triton_blockmax, C >= 32000: the online kernel before stop 27; a candidate), and cuda/triton with the teacher
in top-k form (k = 64; no compiled or Liger top-k exists, so those columns compare with the dense
baselines a user would otherwise run). Per fused backend: ms, % of the measured copy bandwidth on
floor bytes (N*C*(3 reads + 1 write)*element size dense; N*C*(2 reads + 1 write) top-k), and the
speed-up over torch.compile and over Liger. Then every target of the issue that is missed:
  cuda >= 80% and triton >= 65% of copy bandwidth for C >= 32000,
  both >= 1.2x torch.compile and >= 4x Liger at every shape.
Every row is written as it is measured (a run cut short keeps what it has), to --out:
speed_of_light.json (rows in the format measure_backend_choice.py --from-bench reads) and
speed_of_light.md (the table, device, date, commit, command).

  python benchmarks/gpu/speed_of_light.py --out benchmarks/results/gpu_speed_of_light_<date>
  python benchmarks/gpu/speed_of_light.py --dry-run --out /tmp/sol   # CPU, tiny shapes, TRITON_INTERPRET=1
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import bench_grid  # noqa: E402  (first: it sets TRITON_INTERPRET for --dry-run before triton loads)
import torch  # noqa: E402

import smskd_fast  # noqa: E402

SHAPES: Tuple[Tuple[int, int], ...] = ((65536, 100), (16384, 1000), (8192, 32000), (4096, 128256), (1024, 262144))
DRY_RUN_SHAPES: Tuple[Tuple[int, int], ...] = ((64, 100), (8, 5000))
DTYPES = (torch.bfloat16, torch.float32)
BASELINES = ("eager", "compiled", "liger")
FUSED = ("cuda", "triton")
TOPK = ("cuda_topk", "triton_topk")
# Candidates measured in the same run as the defaults, last, so that one run can choose
# (docs/perf_notes.md), not held to the targets: the cuda backend keeping the first packs of each row on
# chip between its sweeps (SMSKD_FAST_CUDA_ROW_CACHE_BYTES=max), at the shapes whose block-per-row
# layouts can keep them (C > 2048; the table's are 32000 and up); and both fused backends at the next
# float above T = 2, which runs their kernels for any temperature instead of those that take the T = 1
# exponentials from the ones at T (temperature_power): the ratio to the cuda / triton columns is that
# change's gain, at the shapes where the exponentials may bind (C >= 32000); and Triton's online kernel with
# a running maximum per column block (a block-wide reduction each step) instead of per 16-byte pack.
CANDIDATES = ("cuda_rowcache", "cuda_anyT", "triton_anyT", "triton_blockmax")
ROW_CACHE_VARIABLE = "SMSKD_FAST_CUDA_ROW_CACHE_BYTES"
# The next float32 above T = 2 (the kernels take T as a float32: the next double would round back to 2).
ANY_TEMPERATURE = torch.nextafter(torch.tensor(bench_grid.TEMPERATURE), torch.tensor(math.inf)).item()
# The targets.
COPY_SHARE_TARGET = {"cuda": 0.80, "triton": 0.65}
COPY_TARGET_MIN_CLASSES = 32000
OVER_COMPILED_TARGET = 1.2
OVER_LIGER_TARGET = 4.0


def with_row_cache(loss_fn: Callable, request: str = "max") -> Callable:
    """loss_fn with the cuda row cache asked for during each call (the variable is read per launch);
    the variable's previous state is restored after it."""
    def loss(*args):
        previous = os.environ.get(ROW_CACHE_VARIABLE)
        os.environ[ROW_CACHE_VARIABLE] = request
        try:
            return loss_fn(*args)
        finally:
            if previous is None:
                del os.environ[ROW_CACHE_VARIABLE]
            else:
                os.environ[ROW_CACHE_VARIABLE] = previous
    return loss


def with_online_config(loss_fn: Callable, config) -> Callable:
    """loss_fn with the Triton launcher's online configuration replaced by config during each call
    (the launcher looks it up per launch); the launcher's own is restored after it."""
    from smskd_fast.backends.triton import launch as triton_launch

    return bench_grid.with_attribute_during_each_call(loss_fn, triton_launch, "online_config",
                                                      lambda num_classes: config)


def block_maxima_config():
    """The default online configuration with one running maximum per column block."""
    from smskd_fast.backends.triton import launch as triton_launch

    default = triton_launch.DEFAULT_ONLINE_CONFIG
    return triton_launch.OnlineConfig(default.block_c, default.num_warps, maxima_columns=default.block_c)


def floor_bytes(impl: str, n: int, c: int, dtype: torch.dtype) -> int:
    """Bytes a loss must move at least: the N x C streams it reads and the gradient it writes."""
    streams = 3 if impl.endswith("_topk") else 4
    return n * c * streams * torch.empty((), dtype=dtype).element_size()


def copy_share(impl: str, n: int, c: int, dtype: str, ms: float, copy_gbps: float) -> float:
    """The fraction of the copy bandwidth that moving the floor bytes in ms milliseconds takes."""
    return floor_bytes(impl, n, c, getattr(torch, dtype)) / (ms * 1e-3) / 1e9 / copy_gbps


def row_key(row: Dict) -> Tuple[str, int, int]:
    return row["dtype"], row["N"], row["C"]


def missed_targets(rows: Sequence[Dict], copy_gbps: float) -> List[str]:
    """Each of the issue's targets that the measured rows miss, one line each (measured rows only)."""
    by_key: Dict[Tuple[str, int, int], Dict[str, float]] = {}
    for row in rows:
        if row.get("ms"):
            by_key.setdefault(row_key(row), {})[row["impl"]] = row["ms"]
    missed = []
    for (dtype, n, c), times in sorted(by_key.items()):
        shape = f"{n}x{c} {dtype}"
        for impl in FUSED + TOPK:
            ms = times.get(impl)
            if ms is None:
                continue
            backend = impl.split("_")[0]
            share = copy_share(impl, n, c, dtype, ms, copy_gbps)
            if c >= COPY_TARGET_MIN_CLASSES and share < COPY_SHARE_TARGET[backend]:
                missed.append(f"{shape} {impl}: {100 * share:.0f}% of copy < {100 * COPY_SHARE_TARGET[backend]:.0f}%")
            for baseline, target in (("compiled", OVER_COMPILED_TARGET), ("liger", OVER_LIGER_TARGET)):
                if baseline in times and times[baseline] / ms < target:
                    missed.append(f"{shape} {impl}: {times[baseline] / ms:.2f}x {baseline} < {target}x")
    return missed


def table(rows: Sequence[Dict], copy_gbps: float) -> str:
    """One line per shape and dtype: baselines in ms, each fused backend as ms (% copy, x compile, x Liger)."""
    by_key: Dict[Tuple[str, int, int], Dict[str, Dict]] = {}
    for row in rows:
        by_key.setdefault(row_key(row), {})[row["impl"]] = row
    fused = FUSED + CANDIDATES + TOPK
    head = ["N x C, dtype", *BASELINES, *fused]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dtype, n, c), impls in sorted(by_key.items(), key=lambda item: (item[0][0], item[0][2])):
        cells = [f"{n}x{c} {dtype}"]
        for impl in BASELINES:
            row = impls.get(impl, {})
            cells.append(f"{row['ms']:.3f}" if row.get("ms") else row.get("error", "-"))
        for impl in fused:
            row = impls.get(impl, {})
            if not row.get("ms"):
                cells.append(row.get("error", "-"))
                continue
            ms = row["ms"]
            parts = []
            if copy_gbps == copy_gbps:  # NaN in a dry run: no copy bandwidth on the CPU
                share = copy_share(impl, n, c, dtype, ms, copy_gbps)
                parts.append(f"{100 * share:.0f}%")
            for baseline, label in (("compiled", "compile"), ("liger", "Liger")):
                if impls.get(baseline, {}).get("ms"):
                    parts.append(f"{impls[baseline]['ms'] / ms:.2f}x {label}")
            cells.append(f"{ms:.3f} ({', '.join(parts)})" if parts else f"{ms:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: Dict) -> str:
    env, copy = results["environment"], results["copy_GBps"]
    missed = missed_targets(results["rows"], copy) if copy == copy else ["not evaluated: no copy bandwidth (dry run)"]
    return "\n".join([
        f"# Fused SMSKD loss against the memory floor on {env['device']}", "",
        f"{env['date']}; commit {env['commit']}; torch {env['torch']}; triton {env['triton']}; "
        f"copy bandwidth {copy:.0f} GB/s (read + write). Command: `{results['command']}`.",
        "Forward + backward of the mean loss, T = 2, triton do_bench median in ms; fused columns: "
        "(% of copy bandwidth on floor bytes, speed-up over torch.compile, over Liger). Top-k: k = 64, "
        "its ratios against the dense baselines.", "",
        table(results["rows"], copy), "",
        f"## Targets missed ({len(missed)})", "", *(f"- {line}" for line in missed or ["none"]),
        "", "Skipped: " + (", ".join(results["skipped"]) or "nothing"), ""])


def write(results: Dict, out: Path) -> None:
    (out / "speed_of_light.json").write_text(json.dumps(results, indent=1))
    (out / "speed_of_light.md").write_text(report(results))


def implementations(dry_run: bool) -> Dict[str, Callable[[], Callable]]:
    return {
        "eager": lambda: bench_grid.eager_smskd,
        "compiled": lambda: torch.compile(bench_grid.eager_smskd, dynamic=True,
                                          backend="eager" if dry_run else "inductor"),
        "liger": bench_grid.liger_loss_factory,
        "cuda": lambda: bench_grid.smskd_fast_loss("cuda"),
        "triton": lambda: bench_grid.smskd_fast_loss("triton"),
    }


def candidates() -> Dict[str, Tuple[int, Callable[[], Callable]]]:
    """CANDIDATES: the fewest classes each is measured at, and its loss factory (measured last: PHASES)."""
    return {
        "cuda_rowcache": (2049, lambda: with_row_cache(bench_grid.smskd_fast_loss("cuda"))),
        "cuda_anyT": (32000, lambda: bench_grid.smskd_fast_loss("cuda", temperature=ANY_TEMPERATURE)),
        "triton_anyT": (32000, lambda: bench_grid.smskd_fast_loss("triton", temperature=ANY_TEMPERATURE)),
        "triton_blockmax": (32000, lambda: with_online_config(bench_grid.smskd_fast_loss("triton"),
                                                              block_maxima_config())),
    }


# The order of measurement, so that a deadline cuts the least needed last: the fused backends and
# torch.compile (the targets' ratios) at every dtype and shape first, then Liger and eager, then the
# top-k forms, then the candidates. Within a phase, dtype by dtype and shape by shape.
PHASES: Tuple[Tuple[str, ...], ...] = (FUSED + ("compiled",), ("liger", "eager"), TOPK, CANDIDATES)


def measurement_plan(shapes: Sequence[Tuple[int, int]]) -> List[Tuple[str, torch.dtype, int, int]]:
    """(implementation, dtype, N, C) in the order they are measured (PHASES); a candidate only from its
    fewest classes on."""
    least = {impl: min_classes for impl, (min_classes, _) in candidates().items()}
    return [(impl, dtype, n, c) for phase in PHASES for dtype in DTYPES for n, c in shapes for impl in phase
            if c >= least.get(impl, 1)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    start = time.monotonic()
    started = bench_grid.start_run(__doc__.splitlines()[0], 290.0, argv)
    if started is None:
        return 2
    args, device, timer, results = started
    available = smskd_fast.available_backends()
    if os.environ.pop(ROW_CACHE_VARIABLE, None) is not None:  # the cuda column is the default's
        results["skipped"].append(f"{ROW_CACHE_VARIABLE} from the environment (unset for this run)")
    factories = {**implementations(args.dry_run), **{impl: factory for impl, (_, factory) in candidates().items()}}
    loss_fns: Dict[str, Callable] = {}  # dense implementations, built once (torch.compile compiles once per dtype)
    usable: Dict[str, bool] = {}  # whether each implementation runs here, decided at its first point

    def prepare(impl: str) -> bool:
        backend = impl.split("_")[0]
        if impl in TOPK:
            reason = None if bench_grid.accepts_topk(backend, device) else "backend unavailable or without top-k"
        elif backend in FUSED and not available[backend]:
            reason = available[backend].reason
        else:
            try:
                loss_fns[impl], reason = factories[impl](), None
            except ImportError as error:
                reason = str(error)
        if reason is not None:
            results["skipped"].append(f"{impl} ({reason})")
        return reason is None

    for impl, dtype, n, c in measurement_plan(DRY_RUN_SHAPES if args.dry_run else SHAPES):
        if impl not in usable:
            usable[impl] = prepare(impl)
        if not usable[impl]:
            continue
        if time.monotonic() - start > args.deadline:
            results["skipped"].append(f"{impl} {dtype} {n}x{c} (deadline)")
            continue
        row = (bench_grid.measure_topk(impl, n, c, dtype, device, timer) if impl in TOPK
               else bench_grid.measure(impl, loss_fns[impl], n, c, dtype, device, timer))
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        write(results, args.out)
    write(results, args.out)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
