#!/usr/bin/env bash
# Host cost per forward+backward, before/after trees alternating, one thread (benchmarks/host_overhead.py),
# each tree on its own PYTHONPATH (both use the python on PATH and one built _C: csrc's change between them
# is the version string only). usage: bash compare.sh BEFORE_TREE AFTER_TREE OUT_DIR
set -euo pipefail
before="$1"; after="$2"; here="$(mkdir -p "$3" && cd "$3" && pwd)"
for run in 1 2 3; do
  for dtype in float32 bfloat16; do
    for side in before after; do
      tree=$before; [ "$side" = after ] && tree=$after
      (cd "$tree" && PYTHONPATH="$tree" python benchmarks/host_overhead.py --dtype "$dtype" --calls 200 --batches 15 \
        --out "$here/${side}_${dtype}_run${run}" > /dev/null 2>&1)
    done
  done
done
python - "$here" <<'PY'
import json, sys, pathlib, statistics
here = pathlib.Path(sys.argv[1])
print("| dtype | run | smskd_fast[cpu] before us | after us | after/before | compiled us (before run, after run) | after/compiled | ops/call before -> after |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for dtype in ("float32", "bfloat16"):
    for run in (1, 2, 3):
        rows = {side: {r["impl"]: r for r in json.loads((here / f"{side}_{dtype}_run{run}.json").read_text())["rows"]}
                for side in ("before", "after")}
        b, a = rows["before"]["smskd_fast[cpu]"], rows["after"]["smskd_fast[cpu]"]
        cb, ca = rows["before"]["compiled"]["us_per_call"], rows["after"]["compiled"]["us_per_call"]
        print(f"| {dtype} | {run} | {b['us_per_call']:.1f} | {a['us_per_call']:.1f} | {a['us_per_call']/b['us_per_call']:.2f} | "
              f"{cb:.1f}, {ca:.1f} | {a['us_per_call']/ca:.2f} | {b['ops_per_call']} -> {a['ops_per_call']} |")
PY
