#!/usr/bin/env bash
# The digits comparison of issue 7: student alone, KD (one stage's length and the full length),
# all methods summed in one stage, sequential stages without the reference, and SMSKD with each
# TCP weighting mode, over 3 seeds (a teacher is trained per seed). Writes
# benchmarks/results/digits_comparison.txt with the command, device, date and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/digits_comparison}
result=benchmarks/results/digits_comparison.txt
command="python -m smskd_fast demo --all-variants --seeds 0 1 2 --out $out"
{
  echo "command: $command"
  echo "config: configs/digits_demo.yaml"
  echo "device: CPU ($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), shared with other jobs"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD)"
  echo "torch: $(python -c 'import torch; print(torch.__version__)')"
  echo
  $command
} 2>&1 | tee "$result"
