#!/usr/bin/env bash
# CPU speed of two builds of the package side by side: benchmarks/cpu_loss_table.py (our op
# only) run alternately from each tree, ROUNDS rounds, so that load drifts hit both alike.
#   bash benchmarks/cpu_build_compare.sh BEFORE_TREE AFTER_TREE [NAME] [extra cpu_loss_table.py args]
# Each tree holds its built extension in place (setup.py build_ext --inplace); BEFORE_COMMIT
# and AFTER_COMMIT name a tree without .git (SMSKD_COMMIT of the results). ROUNDS (default 3)
# and ATEN_CPU_CAPABILITY pass through.
# Writes <NAME>_{before,after}_r<i>.{json,md} to OUT_DIR (default benchmarks/results of this checkout).
set -euo pipefail
before=$(cd "$1" && pwd) after=$(cd "$2" && pwd) name=${3:-cpu_build_compare}
shift $(( $# < 3 ? $# : 3 ))
out=${OUT_DIR:-$(cd "$(dirname "$0")" && pwd)/results}
python=${PYTHON:-python}
for round in $(seq 1 "${ROUNDS:-3}"); do
  for side in before after; do
    tree=$before commit=${BEFORE_COMMIT:-}
    [ "$side" = after ] && tree=$after commit=${AFTER_COMMIT:-}
    (cd "$tree" && SMSKD_COMMIT=${commit:-${SMSKD_COMMIT:-}} PYTHONPATH=. "$python" benchmarks/cpu_loss_table.py --methods smskd_fast --no-memory \
       --out-dir "$out" --name "${name}_${side}_r${round}" "$@" > /dev/null 2>&1)
    echo "round $round $side: $tree"
  done
done
