"""CPU loss benchmark table: our fused op vs eager and torch.compile'd torch.nn.functional.

Times forward alone and forward plus backward of the default SMSKD loss (CE + KD +
TCP-weighted reference KL, mean reduction) for each shape and dtype, the methods interleaved
round by round in one process, and the peak memory of each beyond its inputs. Writes
benchmarks/results/cpu_loss_<stamp>.json (raw numbers and the machine) and .md (table),
refusing to replace existing results.

    PYTHONPATH=. python benchmarks/cpu_loss_table.py                    # the full grid
    PYTHONPATH=. python benchmarks/cpu_loss_table.py --shapes 4096x1000 --dtypes float32
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Dict, Tuple

import torch

from smskd_fast.bench import harness as benchmarking
from smskd_fast.provenance import git_commit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Helpers of this script's own, not the package's: cpu_build_compare.sh runs it against older trees.


def positive_int(text: str) -> int:
    """argparse type of a count: an integer >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_dims(text: str, names: str) -> Tuple[int, ...]:
    """A shape such as 4096x1000 with one positive integer per letter of names ("NC", "NCK")."""
    parts = text.lower().split("x")
    try:
        dims = tuple(int(part) for part in parts)
    except ValueError:
        dims = ()
    if len(dims) != len(names) or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected {'x'.join(names)} with positive integers, got {text!r}")
    return dims


def parse_shape(text: str) -> Tuple[int, int]:
    """NxC, both positive."""
    return parse_dims(text, "NC")


# refuse_existing and write_new_files are harness.refuse_existing / write_files_new again, on purpose:
# benchmarks/cpu_build_compare.sh runs this script against older trees, whose harness has neither.
def refuse_existing(paths) -> None:
    """SystemExit naming the first path that exists: older results are never replaced silently."""
    for path in paths:
        if os.path.exists(path):
            raise SystemExit(f"{path} exists: choose another --name or --out-dir, or remove the old results")


def write_new_files(files: Dict[str, str]) -> None:
    """Writes path -> text as new files, all or none: existing paths are refused; each text goes to a
    temporary file beside its path, and all are renamed into place once all are written."""
    refuse_existing(files)
    temporaries: Dict[str, str] = {}
    try:
        for path, text in files.items():
            folder = os.path.dirname(path) or "."
            os.makedirs(folder, exist_ok=True)
            temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
            with open(temporary, "x") as out:  # the umask's permissions, as a plain write's
                temporaries[path] = temporary
                out.write(text)
    except BaseException:
        for temporary in temporaries.values():
            os.unlink(temporary)
        raise
    for path, temporary in temporaries.items():
        os.replace(temporary, path)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def markdown(meta: dict, rows: list) -> str:
    lines = [
        "# CPU loss benchmark: smskd_fast vs torch.nn.functional (eager and torch.compile)",
        "",
        f"- date (UTC): {meta['date']}",
        f"- commit: {meta['commit']}",
        f"- device: {meta['machine']['cpu']}, {meta['machine']['logical_cpus']} logical CPUs, "
        f"{meta['machine']['torch_threads']} torch threads, ATen capability {meta['machine']['aten_cpu_capability']}",
        f"- torch {meta['machine']['torch']}, Python {meta['machine']['python']}",
        f"- load average at start / end: {meta['machine']['load_average_at_start']} / {meta['load_average_at_end']}",
        f"- command: `{meta['command']}`",
        f"- loss: default SMSKD (CE + KD + inverse-TCP-weighted reference KL, T={benchmarking.TEMPERATURE}, "
        "mean); times: median (min) over the repeats, the methods interleaved round by round; "
        "ratios: median-based (min-based); peak = peak resident memory beyond the inputs, including the "
        "returned gradient; 'grad' = one N x C buffer in the input dtype",
        "",
        "| N x C | dtype | mode | smskd_fast ms | eager ms | compile ms | x eager | x compile "
        "| peak MiB ours / eager / compile | grad MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]

    def fmt(value, spec=".1f"):
        return "-" if value is None else format(value, spec)

    def ms(r, method):
        return f"{fmt(r.get(method + '_ms'), '.2f')} ({fmt(r.get(method + '_min_ms'), '.2f')})"

    def ratio(r, other):
        return f"{fmt(r.get('speedup_vs_' + other), '.2f')} ({fmt(r.get('min_speedup_vs_' + other), '.2f')})"

    for r in rows:
        lines.append(
            f"| {r['n']} x {r['c']} | {r['dtype']} | {r['mode']} | {ms(r, 'smskd_fast')} | {ms(r, 'eager')} | "
            f"{ms(r, 'torch.compile')} | {ratio(r, 'eager')} | {ratio(r, 'torch.compile')} | "
            f"{fmt(r['smskd_fast_peak_mib'])} / {fmt(r.get('eager_peak_mib'))} / "
            f"{fmt(r.get('torch.compile_peak_mib'))} | {fmt(r['gradient_mib'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(benchmarking.SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=[str(d).replace("torch.", "") for d in benchmarking.DTYPES],
                        choices=DTYPE_NAMES)
    parser.add_argument("--modes", nargs="+", default=list(benchmarking.MODES), choices=benchmarking.MODES)
    parser.add_argument("--methods", nargs="+", default=list(benchmarking.METHODS), choices=benchmarking.METHODS)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--name", default=None, help="file name stem (default cpu_loss_<UTC stamp>)")
    args = parser.parse_args(argv)
    if "smskd_fast" not in args.methods:
        parser.error("argument --methods: the table compares the others with smskd_fast, which must be one of them")
    now = datetime.datetime.now(datetime.timezone.utc)
    stem = os.path.join(args.out_dir, args.name or f"cpu_loss_{now.strftime('%Y%m%d-%H%M%S')}")
    refuse_existing([stem + ".json", stem + ".md"])  # at once, not after the run
    meta = {"date": now.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(), "machine": machine(),
            "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + (argv if argv is not None else sys.argv[1:]))}
    dtypes = [getattr(torch, name) for name in args.dtypes]

    def progress(m: benchmarking.Measurement) -> None:
        peak = "-" if m.peak_extra_mib is None else f"{m.peak_extra_mib:.1f} MiB"
        print(f"{m.n}x{m.c} {m.dtype} {m.mode:16} {m.method:13} {m.median_ms:10.2f} ms (min {m.min_ms:.2f})  peak {peak}",
              file=sys.stderr, flush=True)

    results = benchmarking.run_grid(args.shapes, dtypes, args.modes, args.methods, args.repeats,
                                    backend="cpu", with_memory=not args.no_memory, progress=progress)
    meta["load_average_at_end"] = os.getloadavg()
    rows = benchmarking.speedups(results)
    table = markdown(meta, rows)
    write_new_files({stem + ".json": json.dumps({"meta": meta, "measurements": [m.as_dict() for m in results],
                                                 "comparison": rows}, indent=1),
                     stem + ".md": table})
    print(table)


if __name__ == "__main__":
    main()
