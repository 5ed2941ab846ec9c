"""after / before of the C++ top-k kernel's time (CPU time per call and wall min), over the rounds of run.sh.

    python3 summarize.py RESULT_FOLDER      (e.g. rest_sum_d8861f0: the SUB that run.sh wrote)
"""
import json
import statistics
import sys
from pathlib import Path

here = Path(__file__).parent / sys.argv[1]
runs = {side: [json.loads((here / f"{side}_r{i}.json").read_text()) for i in (1, 2, 3)] for side in ("before", "after")}
print("| N x C, k | dtype | mode | before cpu ms | after cpu ms | after / before (cpu, median of rounds) |"
      " after / before (wall min) |")
print("|---|---|---|---:|---:|---:|---:|")
for index, row in enumerate(runs["after"][0]["rows"]):
    cpu = {side: statistics.median(run["rows"][index]["after"]["cpu_median_ms"] for run in runs[side])
           for side in runs}
    wall = {side: min(run["rows"][index]["after"]["min_ms"] for run in runs[side]) for side in runs}
    print(f"| {row['n']} x {row['c']}, {row['k']} | {row['dtype']} | {row['mode']} | {cpu['before']:.2f} | "
          f"{cpu['after']:.2f} | {cpu['after'] / cpu['before']:.3f} | {wall['after'] / wall['before']:.3f} |")
