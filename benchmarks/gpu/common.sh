# The preamble shared by run_all.sh and cuda_checks.sh; sourced, never run:
#
#   source "$(dirname "$0")/common.sh" RESULTS_PREFIX LOG_NAME SECONDS
#
# Moves to the repository root (ROOT), makes OUT (default
# benchmarks/results/RESULTS_PREFIX_<date>) and copies all later output into
# $OUT/LOG_NAME; sets PY (python3 unless PYTHON is set) and START, and defines
# left (the seconds left of the SECONDS budget), step (a timed section header),
# show_backends (the backends smskd_fast finds, with their reasons) and finish STATUS (exit
# once the log is written: the device tool ends the machine's processes when the command
# returns, and tee may still be writing the end of the log, the speed table's included).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/results/$1_$(date -u +%Y%m%d_%H%M%S)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$2") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$(date +%s)
TOTAL=$3
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
step() { echo; echo "== $1 ($(( $(date +%s) - START )) s elapsed, $(left) s left)"; }
show_backends() {
  $PY -c "import smskd_fast; [print(f'{k:10s} {v}') for k, v in smskd_fast.available_backends().items()]"
}
finish() {
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$1"
}
