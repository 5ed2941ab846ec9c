#!/usr/bin/env bash
# The CPU top-k kernel before the far-rest fix (ceb17a5, a worktree at /tmp/before built with SMSKD_FAST_NO_CUDA=1)
# and after it (AFTER, this checkout), alternating rounds, 1 torch thread; results in SUB/.
set -e
out=/work/main/benchmarks/results/cpu_topk_far_rest_2026-12-06; SUB=${SUB:-rest_sum_d8861f0}; AFTER=${AFTER:-d8861f0}; mkdir -p $out/$SUB
for round in 1 2 3; do
  for side in before after; do
    tree=/work/main; commit=$AFTER
    [ $side = before ] && tree=/tmp/before && commit=ceb17a5
    (cd $tree && SMSKD_COMMIT=$commit PYTHONPATH=$tree /work/main/.venv/bin/python /work/main/benchmarks/cpu_topk_table.py \
      --shapes 4096x1000x10 512x32000x64 --dtypes float32 bfloat16 --threads 1 --repeats 5 \
      --out-dir $out/$SUB --name ${side}_r$round > /dev/null 2>&1)
    echo "round $round $side done $(date +%T)"
  done
done
