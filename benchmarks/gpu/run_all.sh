#!/usr/bin/env bash
# One command for a bare GPU machine (torch 2.11, triton 3.6, Python 3.12, no network):
# builds the package in place, runs the GPU tests, the AOT spill check under this
# machine's triton, and the forward+backward benchmark grid (the top-k teacher form first:
# triton vs cuda vs reference top-k vs dense triton, N=8192, C=32000/128256, k=64, bf16),
# all inside ~9.5 minutes.
#
#   OUT=/some/folder SMSKD_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu/run_all.sh
#
# (the device tool copies the tree without .git, so name the commit in SMSKD_COMMIT.)
# Writes to $OUT (default benchmarks/results/gpu_<date>): run_all.log, tests_triton.xml,
# tests_all.xml, triton_aot_report_ci.md, bench_results.json, bench_summary.md,
# bench_plot.png (7 files: the device tool returns at most 8). Wheels in .whl/ (e.g.
# liger-kernel, for the Liger comparison) are installed to /tmp/site first.
# Every step is time-boxed and a failed step does not stop the later ones; the
# exit status is that of the Triton GPU tests.
set -uo pipefail
source "$(dirname "$0")/common.sh" gpu run_all.log "${RUN_ALL_SECONDS:-570}"

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name())"
echo "commit ${SMSKD_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"

step "wheels from .whl/"
if compgen -G ".whl/*.whl" > /dev/null; then
  ls -la .whl/
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "none: the Liger comparison will be skipped"
fi

step "build the extension in place (CUDA, at most 240 s; else CPU-only)"
if ! MAX_JOBS=${MAX_JOBS:-16} timeout 240 $PY setup.py build_ext --inplace -q; then
  echo "CUDA build failed or timed out: building without CUDA (the cuda backend is then skipped)"
  SMSKD_FAST_NO_CUDA=1 $PY setup.py build_ext --inplace -q || echo "CPU-only build failed too"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
show_backends

step "Triton backend tests on the GPU (full shape grid; dense and top-k teacher)"
# pytest-xdist (in the GPU image) spreads the kernel compilations over processes.
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
BUDGET=$(( $(left) - 230 )); [ "$BUDGET" -gt 300 ] && BUDGET=300; [ "$BUDGET" -lt 60 ] && BUDGET=60
timeout "$BUDGET" $PY -m pytest tests/test_triton_backend.py tests/test_triton_topk.py -q -p no:cacheprovider -rs $XDIST \
  --junitxml="$OUT/tests_triton.xml"
TRITON_TESTS=$?
echo "triton tests exit status: $TRITON_TESTS"

step "AOT spill check with this machine's triton"
timeout 90 $PY benchmarks/triton_aot_report.py --ci --jobs 16 --out /tmp/aot \
  && cp /tmp/aot/triton_aot_report_ci.md "$OUT/" || { echo "AOT report failed"; cp /tmp/aot/triton_aot_report_ci.md "$OUT/" 2>/dev/null; }

step "the rest of the test suite (GPU tests run, CPU tests too)"
REST=$(( $(left) - 200 ))
if [ "$REST" -gt 30 ]; then
  timeout "$REST" $PY -m pytest tests -q -p no:cacheprovider -rs \
    --ignore=tests/test_triton_backend.py --ignore=tests/test_triton_topk.py --junitxml="$OUT/tests_all.xml" || echo "other tests: failures or timeout"
else
  echo "skipped: too little time left"
fi

step "benchmark grid"
DEADLINE=$(( $(left) - 40 ))
timeout $(( DEADLINE + 35 )) $PY benchmarks/gpu/bench_grid.py --out "$OUT" --deadline "$DEADLINE" \
  || echo "benchmark failed or timed out (partial results are in $OUT)"

step "done"
ls -la "$OUT"
exit "$TRITON_TESTS"
