#!/usr/bin/env bash
# before (77543e1, flat package) vs after (main), each tree running its own copy of
# benchmarks/cpu_kernel_cputime.py (same logic; only the harness's import path differs), alternately.
set -u
OUT=/work/main/benchmarks/results/cpu_restructure_2026-12-05
PY=/work/main/.venv/bin/python
for round in 1 2 3; do
  for side in before after; do
    tree=/work/wt/before; [ $side = after ] && tree=/work/main
    start=$(date +%s)
    (cd $tree && PYTHONPATH=$tree $PY benchmarks/cpu_kernel_cputime.py --out-dir $OUT --name restructure_${side}_r${round} > /dev/null 2>&1)
    echo "round $round $side: $tree rc=$? $(( $(date +%s) - start )) s"
  done
done
$PY /work/main/benchmarks/cpu_build_summary.py $OUT restructure
