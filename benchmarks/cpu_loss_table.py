"""CPU loss benchmark table: our fused op vs eager and torch.compile'd torch.nn.functional.

Times forward alone and forward plus backward of the default SMSKD loss (CE + KD +
TCP-weighted reference KL, mean reduction) for each shape and dtype, one method after
another in one process, and the peak memory of each beyond its inputs. Writes
benchmarks/results/cpu_loss_<stamp>.json (raw numbers and the machine) and .md (table).

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

import torch

from smskd_fast.bench import harness as benchmarking
from smskd_fast.provenance import git_commit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_shape(text: str):
    n, c = text.lower().split("x")
    return int(n), int(c)


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
    parser.add_argument("--dtypes", nargs="+", default=[str(d).replace("torch.", "") for d in benchmarking.DTYPES])
    parser.add_argument("--modes", nargs="+", default=list(benchmarking.MODES), choices=benchmarking.MODES)
    parser.add_argument("--methods", nargs="+", default=list(benchmarking.METHODS), choices=benchmarking.METHODS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--name", default=None, help="file name stem (default cpu_loss_<UTC stamp>)")
    args = parser.parse_args(argv)

    now = datetime.datetime.now(datetime.timezone.utc)
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
    stem = args.name or f"cpu_loss_{now.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, stem + ".json"), "w") as out:
        json.dump({"meta": meta, "measurements": [m.as_dict() for m in results], "comparison": rows}, out, indent=1)
    table = markdown(meta, rows)
    with open(os.path.join(args.out_dir, stem + ".md"), "w") as out:
        out.write(table)
    print(table)


if __name__ == "__main__":
    main()
