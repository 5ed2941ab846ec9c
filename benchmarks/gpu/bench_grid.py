"""Forward+backward benchmark grid of the SMSKD loss on one GPU, with bandwidth against the floor.

Implementations, each computing the same loss (CE + T^2 KL(teacher) + T^2 w KL(reference),
mean over rows) and d loss / d student:
  eager          the PyTorch composition (fp32 upcast, log_softmax/softmax, gather)
  compiled       torch.compile(eager, dynamic=True): one compile per dtype, not per shape
  triton         smskd_fast.smskd_loss(backend="triton")
  triton_inplace the same with overwrite_student_logits=True (no N x C gradient buffer)
  cuda           smskd_fast.smskd_loss(backend="cuda"), when that backend is available
  liger          LigerCrossEntropyLoss + two LigerKLDIVLoss (batchmean, log_target=True)
                 on torch log_softmax inputs, when liger_kernel imports; Liger's KL has
                 no per-row weight, so its reference term uses w = 1 (same traffic)
The teacher in top-k form (a logit cache's; smskd_fast/backends/topk.py), k = TOPK_K, bf16:
  triton_topk    smskd_loss(teacher_topk=..., backend="triton")
  cuda_topk      the same with backend="cuda", when that backend accepts teacher_topk
  reference_topk the same with backend="reference" (PyTorch composition)
  triton_dense   backend="triton" with the dense teacher, for scale
Bandwidth: floor bytes N*C*(3 reads + 1 write)*element size divided by the median time,
and as a fraction of the device's copy bandwidth (a large device-to-device copy,
bytes read + written). Also sweeps the online kernel's configurations.

Results are written after every measurement (so a run cut short still returns data):
  bench_results.json, bench_summary.md, bench_plot.png in --out.

  python benchmarks/gpu/bench_grid.py --out $OUT --deadline 300
  python benchmarks/gpu/bench_grid.py --dry-run --out /tmp/dry   # CPU, tiny shapes, TRITON_INTERPRET=1
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import smskd_fast  # noqa: E402
from smskd_fast.provenance import git_commit  # noqa: E402
from smskd_fast.backends.triton import launch as triton_launch  # noqa: E402
from smskd_fast.backends.topk import TopKTeacher  # noqa: E402

TEMPERATURE = 2.0
IMPLEMENTATIONS = ("triton", "triton_inplace", "cuda", "liger", "eager", "compiled")
TOPK_K = 64
TOPK_IMPLEMENTATIONS = ("triton_topk", "cuda_topk", "reference_topk", "triton_dense")


def eager_smskd(student, target, teacher, reference):
    """The loss as one writes it in PyTorch (fp32 math), mean over rows."""
    T = TEMPERATURE
    s = student.float()
    log_q = F.log_softmax(s / T, dim=-1)
    ce = F.cross_entropy(s, target, reduction="none")
    with torch.no_grad():
        t = teacher.float()
        log_p_t = F.log_softmax(t / T, dim=-1)
        log_p_r = F.log_softmax(reference.float() / T, dim=-1)
        weight = 1.0 - F.softmax(t, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    kd = (log_p_t.exp() * (log_p_t - log_q)).sum(-1)
    ref = (log_p_r.exp() * (log_p_r - log_q)).sum(-1)
    return (ce + T * T * kd + T * T * weight * ref).mean()


def liger_loss_factory() -> Callable:
    """The Liger composition, or an ImportError that says why not."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except Exception as error:  # liger_kernel is optional and imports transformers
        raise ImportError(f"liger_kernel unavailable: {type(error).__name__}: {error}") from error
    cross_entropy = LigerCrossEntropyLoss()
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(student, target, teacher, reference):
        T = TEMPERATURE
        # log_softmax first: Liger's cross entropy overwrites its input with the gradient.
        log_q = F.log_softmax(student.float() / T, dim=-1)
        with torch.no_grad():
            log_p_t = F.log_softmax(teacher.float() / T, dim=-1)
            log_p_r = F.log_softmax(reference.float() / T, dim=-1)
        return cross_entropy(student, target) + T * T * (kl(log_q, log_p_t) + kl(log_q, log_p_r))

    return loss


def with_attribute_during_each_call(loss_fn: Callable, owner, name: str, value) -> Callable:
    """loss_fn with owner.name set to value during each call (for what the library looks up per call:
    a launcher's chooser, a path's test), restored after it: a variant measured beside the default."""
    def loss(*args):
        previous = getattr(owner, name)
        setattr(owner, name, value)
        try:
            return loss_fn(*args)
        finally:
            setattr(owner, name, previous)
    return loss


def smskd_fast_loss(backend: str, overwrite: bool = False, temperature: float = TEMPERATURE) -> Callable:
    def loss(student, target, teacher, reference):
        return smskd_fast.smskd_loss(student, target, teacher, reference, temperature=temperature,
                                     backend=backend, overwrite_student_logits=overwrite).loss
    return loss


class Timer:
    """Median time of fn in ms: triton's do_bench on a GPU, a wall clock on the CPU (dry run)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], None], grad_to_none: List[torch.Tensor]) -> float:
        if self.device == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))
        fn()
        times = []
        for _ in range(3):
            for tensor in grad_to_none:
                tensor.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s), median of do_bench."""
    if device != "cuda":
        return float("nan")
    from triton.testing import do_bench

    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = do_bench(lambda: target.copy_(source), warmup=25, rep=200, return_mode="median")
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def make_inputs(n: int, c: int, dtype: torch.dtype, device: str):
    generator = torch.Generator(device=device).manual_seed(n + c)
    logits = [(torch.randn(n, c, generator=generator, device=device) * 2).to(dtype) for _ in range(3)]
    target = torch.randint(0, c, (n,), generator=generator, device=device)
    return logits[0], target, logits[1], logits[2]


def measure(name: str, loss_fn: Callable, n: int, c: int, dtype: torch.dtype, device: str, timer: Timer) -> Dict:
    """One grid point; errors (out of memory included) are recorded, and the memory is released."""
    row = {"impl": name, "N": n, "C": c, "dtype": str(dtype).replace("torch.", "")}
    return recorded(row, device, lambda: _time_one(loss_fn, n, c, dtype, device, timer))


def recorded(row: Dict, device: str, time_it: Callable[[], Dict]) -> Dict:
    """row with time_it()'s figures, or the error that stopped it (the grid goes on); the memory is released."""
    try:
        row.update(time_it())
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as error:  # reported in the table, the grid goes on
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _time_with_peak(step: Callable[[], None], student: torch.Tensor, device: str, timer: Timer) -> Dict:
    """The step's time and, on CUDA, its peak memory above what was allocated before it."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    result = {"ms": timer(step, [student])}
    if device == "cuda":
        result["peak_extra_GB"] = (torch.cuda.max_memory_allocated() - baseline) / 1e9
    return result


def _time_one(loss_fn: Callable, n: int, c: int, dtype: torch.dtype, device: str, timer: Timer) -> Dict:
    student, target, teacher, reference = make_inputs(n, c, dtype, device)
    student.requires_grad_()

    def step():
        loss_fn(student, target, teacher, reference).backward()

    result = _time_with_peak(step, student, device, timer)
    floor_bytes = n * c * 4 * student.element_size()
    result["floor_GB"] = floor_bytes / 1e9
    result["GBps"] = floor_bytes / (result["ms"] * 1e-3) / 1e9
    return result


def sweep_online_configs(c: int, dtype: torch.dtype, device: str, timer: Timer, n: int) -> List[Dict]:
    """Kernel-only forward+gradient time of each online configuration (refines DEFAULT_ONLINE_CONFIG)."""
    rows = []
    student, target, teacher, reference = make_inputs(n, c, dtype, device)
    row_align = triton_launch.logits_row_alignment(c, (student, teacher, reference))
    for config in triton_launch.ONLINE_CONFIGS:
        def step():
            triton_launch.launch_rows(student, target, teacher, reference, TEMPERATURE, 1.0, 1.0, 1.0,
                                      "inverse_tcp", -100, True, config=config)
        ms = timer(step, [])
        floor_bytes = n * c * 4 * student.element_size()
        rows.append({"N": n, "C": c, "dtype": str(dtype).replace("torch.", ""), "block_c": config.block_c,
                     "num_warps": config.num_warps, "maxima_columns": config.pack(student.element_size(), row_align),
                     "ms": ms, "GBps": floor_bytes / (ms * 1e-3) / 1e9})
    return rows


def measure_topk(impl: str, n: int, c: int, dtype: torch.dtype, device: str, timer: Timer) -> Dict:
    """Forward+backward of the loss with the teacher in top-k form (or dense, for triton_dense)."""
    row = {"impl": impl, "N": n, "C": c, "k": TOPK_K, "dtype": str(dtype).replace("torch.", "")}
    return recorded(row, device, lambda: _time_topk(impl, n, c, dtype, device, timer))


def _time_topk(impl: str, n: int, c: int, dtype: torch.dtype, device: str, timer: Timer) -> Dict:
    student, target, teacher, reference = make_inputs(n, c, dtype, device)
    student.requires_grad_()
    # The cache's form, built once outside the timed step, as a cache reader hands it over.
    topk = TopKTeacher.from_logits(teacher, target, TOPK_K, TEMPERATURE)
    backend = impl.split("_")[0]
    dense = impl == "triton_dense"
    if not dense:
        del teacher

    def step():
        smskd_fast.smskd_loss(student, target, teacher if dense else None, reference,
                              teacher_topk=None if dense else topk, temperature=TEMPERATURE,
                              backend=backend).loss.backward()

    return _time_with_peak(step, student, device, timer)


def accepts_topk(backend: str, device: str) -> bool:
    """Whether the backend can run here with a top-k teacher."""
    from smskd_fast.backends.registry import get_backend

    try:
        get_backend(backend, torch.device(device), topk=True)
    except (ValueError, RuntimeError):
        return False
    return True


def environment(device: str) -> Dict:
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
            "backends": {name: str(status) for name, status in smskd_fast.available_backends().items()}}
    info["commit"] = git_commit()  # the device machine's tree has no .git: SMSKD_COMMIT names it
    return info


def start_run(description: str, deadline: float, argv=None) -> Optional[Tuple[argparse.Namespace, str, "Timer", Dict]]:
    """A GPU script's start: its options and device (run_arguments), a Timer, and its results so far
    (command, environment, copy bandwidth, no rows); None when a GPU run finds no GPU."""
    parsed = run_arguments(description, deadline, argv)
    if parsed is None:
        return None
    args, device = parsed
    env = environment(device)
    results = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "environment": env,
               "device": env["device"], "torch": env["torch"], "copy_GBps": copy_bandwidth(device),
               "rows": [], "skipped": []}
    return args, device, Timer(device), results


def summary_markdown(results: Dict) -> str:
    env = results["environment"]
    copy = results["copy_GBps"]
    lines = [f"# SMSKD loss forward+backward on {env['device']}", "",
             f"{env['date']}; commit {env['commit']}; torch {env['torch']}; triton {env['triton']}; "
             f"copy bandwidth {copy:.0f} GB/s (read+write). Command: `{results['command']}`.",
             "Floor bytes = N*C*(3 reads + 1 write)*element size; GB/s = floor bytes / median time; "
             "% copy = GB/s / copy bandwidth; x eager etc. = speed-up of triton over that implementation.", "",
             "| dtype | N | C | impl | ms | GB/s | % copy | peak extra GB | triton speed-up | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    triton_ms = {(r["dtype"], r["N"], r["C"]): r.get("ms") for r in results["grid"] if r["impl"] == "triton"}
    for row in sorted(results["grid"], key=lambda r: (r["dtype"], r["N"], r["C"], IMPLEMENTATIONS.index(r["impl"]))):
        ms = row.get("ms")
        ours = triton_ms.get((row["dtype"], row["N"], row["C"]))
        speedup = f"{ms / ours:.2f}x" if ms and ours else ""
        percent = f"{100 * row['GBps'] / copy:.0f}%" if ms and copy == copy else ""
        ms_text = "" if ms is None else f"{ms:.3f}"
        bandwidth = "" if ms is None else f"{row['GBps']:.0f}"
        peak = f"{row['peak_extra_GB']:.2f}" if "peak_extra_GB" in row else ""
        lines.append(f"| {row['dtype']} | {row['N']} | {row['C']} | {row['impl']} | {ms_text} | {bandwidth} | "
                     f"{percent} | {peak} | {speedup} | {row.get('error', '')} |")
    if results["topk"]:
        lines += ["", f"## Teacher in top-k form (k = {TOPK_K}), forward + backward", "",
                  "| dtype | N | C | impl | ms | peak extra GB | x triton_topk | note |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        ours = {(r["dtype"], r["N"], r["C"]): r.get("ms") for r in results["topk"] if r["impl"] == "triton_topk"}
        for row in results["topk"]:
            ms, base = row.get("ms"), ours.get((row["dtype"], row["N"], row["C"]))
            ms_text = "" if ms is None else f"{ms:.3f}"
            peak = f"{row['peak_extra_GB']:.2f}" if "peak_extra_GB" in row else ""
            ratio = f"{ms / base:.2f}x" if ms and base else ""
            lines.append(f"| {row['dtype']} | {row['N']} | {row['C']} | {row['impl']} | {ms_text} | {peak} | "
                         f"{ratio} | {row.get('error', '')} |")
    if results["sweep"]:
        lines += ["", "## Online kernel configurations (kernel only, forward + gradient)", "",
                  "| dtype | N | C | BLOCK_C | warps | columns per maximum | ms | GB/s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in results["sweep"]:
            lines.append(f"| {row['dtype']} | {row['N']} | {row['C']} | {row['block_c']} | {row['num_warps']} | "
                         f"{row.get('maxima_columns', row['block_c'])} | {row['ms']:.3f} | {row['GBps']:.0f} |")
    lines += ["", "Skipped: " + (", ".join(results["skipped"]) or "nothing")]
    return "\n".join(lines) + "\n"


def plot(results: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["dtype"], r["N"]) for r in results["grid"]})
    figure, axes = plt.subplots(1, max(1, len(keys)), figsize=(5 * max(1, len(keys)), 4), squeeze=False)
    for axis, (dtype, n) in zip(axes[0], keys):
        for impl in IMPLEMENTATIONS:
            points = sorted((r["C"], r["GBps"]) for r in results["grid"]
                            if r["impl"] == impl and r["dtype"] == dtype and r["N"] == n and "GBps" in r)
            if points:
                axis.plot(*zip(*points), marker="o", label=impl)
        if results["copy_GBps"] == results["copy_GBps"]:
            axis.axhline(results["copy_GBps"], color="black", linestyle="--", label="copy bandwidth")
        axis.set_xscale("log")
        axis.set_title(f"{dtype}, N={n}")
        axis.set_xlabel("C (classes)")
        axis.set_ylabel("floor bytes / time (GB/s)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(results: Dict, out: Path) -> None:
    (out / "bench_results.json").write_text(json.dumps(results, indent=1))
    (out / "bench_summary.md").write_text(summary_markdown(results))


def run_arguments(description: str, deadline: float, argv=None) -> Optional[Tuple[argparse.Namespace, str]]:
    """The options of a GPU benchmark script (--out, --deadline, --dry-run) and the device it runs
    on; None, after saying why, when a run that needs a GPU finds none."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=deadline, help="seconds; later measurements are skipped")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, kernels under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a machine without a GPU", file=sys.stderr)
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    return args, device


def main(argv=None) -> int:
    start = time.monotonic()
    parsed = run_arguments(__doc__.splitlines()[0], 330.0, argv)
    if parsed is None:
        return 2
    args, device = parsed
    timer = Timer(device)
    rows_n = (8,) if args.dry_run else (4096, 16384)
    classes = (100, 5000) if args.dry_run else (1000, 32000, 128256)
    dtypes = (torch.bfloat16, torch.float32)

    results = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "environment": environment(device),
               "copy_GBps": copy_bandwidth(device), "grid": [], "topk": [], "sweep": [], "skipped": []}
    print(f"copy bandwidth: {results['copy_GBps']:.0f} GB/s", flush=True)

    # The top-k form first: few points, and the newest kernel.
    available = smskd_fast.available_backends()
    topk_backends = {name for name in ("triton", "cuda", "reference") if accepts_topk(name, device)}
    for c in ((100, 5000) if args.dry_run else (32000, 128256)):
        for impl in TOPK_IMPLEMENTATIONS:
            if impl.split("_")[0] not in topk_backends and impl != "triton_dense":
                results["skipped"].append(f"{impl} C={c} (backend unavailable or without top-k)")
                continue
            if time.monotonic() - start > args.deadline:
                results["skipped"].append(f"{impl} C={c} (deadline)")
                continue
            row = measure_topk(impl, 8 if args.dry_run else 8192, c, torch.bfloat16, device, timer)
            results["topk"].append(row)
            print(json.dumps(row), flush=True)
            write(results, args.out)

    factories: Dict[str, Callable[[], Callable]] = {
        "triton": lambda: smskd_fast_loss("triton"),
        "triton_inplace": lambda: smskd_fast_loss("triton", overwrite=True),
        "cuda": lambda: smskd_fast_loss("cuda"),
        "liger": liger_loss_factory,
        "eager": lambda: eager_smskd,
        "compiled": lambda: torch.compile(eager_smskd, dynamic=True, backend="eager" if args.dry_run else "inductor"),
    }
    for impl in IMPLEMENTATIONS:
        if impl == "cuda" and not available["cuda"]:
            results["skipped"].append(f"cuda ({available['cuda'].reason})")
            continue
        if impl == "liger" and args.dry_run:
            results["skipped"].append("liger (needs a GPU)")
            continue
        try:
            loss_fn: Optional[Callable] = factories[impl]()
        except ImportError as error:
            results["skipped"].append(f"{impl} ({error})")
            continue
        for dtype in dtypes:
            for n in rows_n:
                for c in classes:
                    if time.monotonic() - start > args.deadline:
                        results["skipped"].append(f"{impl} {dtype} N={n} C={c} (deadline)")
                        continue
                    row = measure(impl, loss_fn, n, c, dtype, device, timer)
                    results["grid"].append(row)
                    print(json.dumps(row), flush=True)
                    write(results, args.out)
    for dtype in dtypes:
        for c in ((5000,) if args.dry_run else (32000, 128256, 262144)):
            if time.monotonic() - start > args.deadline:
                results["skipped"].append(f"sweep {dtype} C={c} (deadline)")
                continue
            try:
                results["sweep"] += sweep_online_configs(c, dtype, device, timer, n=8 if args.dry_run else 4096)
            except Exception as error:  # recorded, the rest still runs
                results["skipped"].append(f"sweep {dtype} C={c} ({type(error).__name__}: {error})")
            write(results, args.out)
    write(results, args.out)
    try:
        plot(results, args.out / "bench_plot.png")
    except Exception as error:  # the JSON and the table matter more than the picture
        print(f"plot failed: {type(error).__name__}: {error}", file=sys.stderr)
    print(summary_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
