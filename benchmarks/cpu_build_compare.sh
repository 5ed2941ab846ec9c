#!/usr/bin/env bash
# CPU speed of two builds of the package side by side: a benchmark script of this checkout
# (SCRIPT, default cpu_kernel_cputime.py; or cpu_loss_table.py --methods smskd_fast --no-memory)
# run alternately with each tree's package, ROUNDS rounds, so that load drifts hit both alike;
# then cpu_build_summary.py.
#   bash benchmarks/cpu_build_compare.sh BEFORE_TREE AFTER_TREE NAME [extra script args]
# Each tree holds its built extension in place (setup.py build_ext --inplace); BEFORE_COMMIT
# and AFTER_COMMIT name a tree without .git (SMSKD_COMMIT of the results). ROUNDS (default 3)
# and ATEN_CPU_CAPABILITY pass through. Writes NAME_{before,after}_r<i>.json and
# NAME_summary.md to OUT_DIR (default benchmarks/results of this checkout).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
before=$(cd "$1" && pwd) after=$(cd "$2" && pwd) name=$3
shift 3
out=${OUT_DIR:-$here/results}
script=$here/${SCRIPT:-cpu_kernel_cputime.py}
python=${PYTHON:-python}
for round in $(seq 1 "${ROUNDS:-3}"); do
  for side in before after; do
    tree=$before commit=${BEFORE_COMMIT:-}
    [ "$side" = after ] && tree=$after commit=${AFTER_COMMIT:-}
    (cd "$tree" && SMSKD_COMMIT=${commit:-${SMSKD_COMMIT:-}} PYTHONPATH=$tree "$python" "$script" \
       --out-dir "$out" --name "${name}_${side}_r${round}" "$@" > /dev/null 2>&1)
    echo "round $round $side: $tree"
  done
done
"$python" "$here/cpu_build_summary.py" "$out" "$name"
