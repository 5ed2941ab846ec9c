"""Summary of benchmarks/cpu_build_compare.sh: per case, the before and after times over all rounds.

For each shape, dtype and mode: the fastest time of any round (min of the per-run minima,
the least disturbed by other load) and the median of the per-run medians, before and after,
with after/before ratios. Writes <dir>/<name>_summary.md and prints it.

    python benchmarks/cpu_build_summary.py DIR NAME
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import sys


def runs(directory: str, name: str, side: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(directory, f"{name}_{side}_r*.json")))
    if not paths:
        raise SystemExit(f"no {name}_{side}_r*.json in {directory}")
    return [json.load(open(path)) for path in paths]


def by_case(results: list[dict]) -> dict[tuple, list[dict]]:
    cases: dict[tuple, list[dict]] = {}
    for result in results:
        for m in result["measurements"]:
            cases.setdefault((m["n"], m["c"], m["dtype"], m["mode"]), []).append(m)
    return cases


def summary(directory: str, name: str) -> str:
    before, after = runs(directory, name, "before"), runs(directory, name, "after")
    lines = [f"# {name}: before vs after, {len(before)} + {len(after)} alternating runs", ""]
    for side, results in (("before", before), ("after", after)):
        metas = [r["meta"] for r in results]
        lines.append(f"- {side}: commit {sorted({m['commit'] for m in metas})}, dates {metas[0]['date']} .. "
                     f"{metas[-1]['date']} UTC, ATen capability {metas[0]['machine']['aten_cpu_capability']}, "
                     f"load average at start {[m['machine']['load_average_at_start'][0] for m in metas]}")
    machine = before[0]["meta"]["machine"]
    lines += [f"- device: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['torch_threads']} "
              f"torch threads, torch {machine['torch']}", "",
              "| N x C | dtype | mode | fastest ms before | after | after/before | median ms before | after "
              "| after/before |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    old, new = by_case(before), by_case(after)
    for case in old:
        fast_b, fast_a = min(m["min_ms"] for m in old[case]), min(m["min_ms"] for m in new[case])
        med_b = statistics.median(m["median_ms"] for m in old[case])
        med_a = statistics.median(m["median_ms"] for m in new[case])
        n, c, dtype, mode = case
        lines.append(f"| {n} x {c} | {dtype} | {mode} | {fast_b:.2f} | {fast_a:.2f} | {fast_a / fast_b:.2f} "
                     f"| {med_b:.2f} | {med_a:.2f} | {med_a / med_b:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    directory, name = sys.argv[1], sys.argv[2]
    text = summary(directory, name)
    with open(os.path.join(directory, f"{name}_summary.md"), "w") as out:
        out.write(text)
    print(text)
