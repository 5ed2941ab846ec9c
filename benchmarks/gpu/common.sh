# The preamble shared by run_all.sh and cuda_checks.sh; sourced, never run:
#
#   source "$(dirname "$0")/common.sh" RESULTS_PREFIX LOG_NAME SECONDS
#
# Moves to the repository root (ROOT), makes OUT (default
# benchmarks/results/RESULTS_PREFIX_<date>) and copies all later output into
# $OUT/LOG_NAME; sets PY (python3 unless PYTHON is set) and START, and defines
# left (the seconds left of the SECONDS budget), step (a timed section header)
# and show_backends (the backends smskd_fast finds, with their reasons).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/results/$1_$(date -u +%Y%m%d_%H%M%S)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$2") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$(date +%s)
TOTAL=$3
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
step() { echo; echo "== $1 ($(( $(date +%s) - START )) s elapsed, $(left) s left)"; }
show_backends() {
  $PY -c "import smskd_fast; [print(f'{k:10s} {v}') for k, v in smskd_fast.available_backends().items()]"
}
