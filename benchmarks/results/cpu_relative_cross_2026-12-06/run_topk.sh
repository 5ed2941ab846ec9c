#!/usr/bin/env bash
# The CPU top-k kernel before (6e202b5) and after (0d68a1e) the relative cross sums, two worktrees built with
# SMSKD_FAST_NO_CUDA=1 at /tmp/wt_6e202b5 and /tmp/wt_87a7c24 (the latter with 0d68a1e's csrc), alternating
# rounds, 1 torch thread; results in topk/. Summary: python3 ../cpu_topk_far_rest_2026-12-06/summarize.py
# ../cpu_relative_cross_2026-12-06/topk (it reads three rounds).
set -e
out=/work/main/benchmarks/results/cpu_relative_cross_2026-12-06/topk; mkdir -p $out
for round in 1 2 3; do
  for side in before after; do
    tree=/tmp/wt_87a7c24; commit=0d68a1e
    [ $side = before ] && tree=/tmp/wt_6e202b5 && commit=6e202b5
    (cd $tree && SMSKD_COMMIT=$commit PYTHONPATH=$tree /work/main/.venv/bin/python /work/main/benchmarks/cpu_topk_table.py \
      --shapes 4096x1000x10 512x32000x64 --dtypes float32 bfloat16 --threads 1 --repeats 5 \
      --out-dir $out --name ${side}_r$round > /dev/null 2>&1)
    echo "round $round $side done $(date +%T)"
  done
done
