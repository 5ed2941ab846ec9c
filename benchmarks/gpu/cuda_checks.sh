#!/usr/bin/env bash
# The CUDA backend's checks on a GPU machine (nvcc, cmake, compute-sanitizer there),
# in one command of under 10 minutes:
#
#   OUT=/some/folder bash benchmarks/gpu/cuda_checks.sh
#
# 1. builds smskd_fast._C in place unless it already has the CUDA kernel
#    (so it can follow benchmarks/gpu/run_all.sh in the same machine session);
# 2. the CUDA pytest files (full float64-reference grid, resources, host emulation),
#    the top-k form's included (tests/test_cuda_topk*.py);
# 3. kernels/ with CMake for this GPU's architecture, and ctest (GPU grids of both forms,
#    bad-target assertion, host emulations);
# 4. compute-sanitizer memcheck and racecheck on the standalone tests (--quick grids of
#    test_smskd_kernels and test_topk_kernels), and memcheck on the top-k operator's cases
#    (benchmarks/gpu/topk_sanitizer_case.py: the wrapper's mask build included);
# 5. the standalone bf16 bandwidth benchmarks against the device copy bandwidth (dense,
#    and top-k beside dense);
# 6. cuda vs triton per (dtype, C): backend="auto"'s table.
# Writes to $OUT (default benchmarks/results/gpu_cuda_<date>), 8 files: cuda_checks.log,
# tests_cuda.xml, tests_progress.txt (one line per test outcome as the tests run, from
# tests/run_guard.py, which also time-boxes each test), kernels_ctest.txt, sanitizer.txt,
# bench_kernels.txt (dense, then top-k beside dense), backend_choice.json, gpu_choice_table.json. Each step is time-boxed and a failing
# step does not stop the later ones; the exit status is non-zero when the tests,
# ctest or a sanitizer failed.
set -uo pipefail
source "$(dirname "$0")/common.sh" gpu_cuda cuda_checks.log 570
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
STATUS=0
fail() { echo "FAILED: $1"; STATUS=1; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
command -v nvcc && nvcc --version | tail -1
command -v compute-sanitizer || echo "compute-sanitizer not on PATH"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
git -C "$ROOT" log -1 --format='commit %h %s' 2>/dev/null || true
ARCH=$($PY -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
echo "compute capability: $ARCH"

step "build smskd_fast._C with CUDA (unless already built)"
HAS_CUDA_OP="import torch, smskd_fast; from smskd_fast import ops; \
assert all(torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CUDA') for op in (ops.OP_NAME, ops.TOPK_OP_NAME))"
if ! $PY -c "$HAS_CUDA_OP" 2>/dev/null; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") MAX_JOBS=${MAX_JOBS:-16} timeout 300 $PY setup.py build_ext --inplace -q \
    || fail "CUDA build of smskd_fast._C"
fi
show_backends

step "CUDA tests (pytest)"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
SMSKD_TEST_TIMEOUT=${SMSKD_TEST_TIMEOUT:-120} SMSKD_TEST_PROGRESS="$OUT/tests_progress.txt" \
  timeout -s INT -k 20 330 $PY -m pytest tests/test_cuda_backend.py tests/test_cuda_topk.py \
  tests/test_cuda_topk_host_math.py tests/test_cuda_resources.py tests/test_gpu_choice.py \
  -q -p no:cacheprovider -rfE $XDIST --junitxml="$OUT/tests_cuda.xml" || fail "pytest"

step "kernels/ with CMake + ctest (sm_$ARCH)"
BUILD=/tmp/smskd_kernels_build
{ timeout 240 cmake -S kernels -B "$BUILD" -DSMSKD_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_BUILD_TYPE=Release \
    && timeout 240 cmake --build "$BUILD" -j 16 \
    && (cd "$BUILD" && timeout 180 ctest --output-on-failure) \
    && "$BUILD/test_smskd_kernels"; } > "$OUT/kernels_ctest.txt" 2>&1 || fail "kernels/ build or ctest"
tail -n 25 "$OUT/kernels_ctest.txt"

step "compute-sanitizer on the standalone tests and the top-k operator"
if command -v compute-sanitizer > /dev/null && [ -x "$BUILD/test_smskd_kernels" ]; then
  for tool in memcheck racecheck; do
    echo "--- $tool" >> "$OUT/sanitizer.txt"
    timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 9 "$BUILD/test_smskd_kernels" --quick \
      >> "$OUT/sanitizer.txt" 2>&1 || fail "compute-sanitizer $tool"
    echo "--- standalone top-k $tool" >> "$OUT/sanitizer.txt"
    timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 9 "$BUILD/test_topk_kernels" --quick \
      >> "$OUT/sanitizer.txt" 2>&1 || fail "compute-sanitizer $tool (standalone top-k)"
  done
else
  echo "skipped: no compute-sanitizer or no standalone build" | tee "$OUT/sanitizer.txt"
fi
if command -v compute-sanitizer > /dev/null; then  # memcheck only: racecheck (shared memory) is covered above
  echo "--- top-k operator memcheck" >> "$OUT/sanitizer.txt"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY benchmarks/gpu/topk_sanitizer_case.py >> "$OUT/sanitizer.txt" 2>&1 || fail "compute-sanitizer memcheck (top-k operator)"
fi
grep -E "^--- |ERROR SUMMARY|RACECHECK SUMMARY|cases? (passed|FAILED)|top-k cases passed|sanitizer cases ran" "$OUT/sanitizer.txt"

step "standalone bf16 bandwidth benchmark"
[ -x "$BUILD/test_smskd_kernels" ] && timeout 60 "$BUILD/test_smskd_kernels" --bench | tee "$OUT/bench_kernels.txt"
step "standalone bf16 top-k benchmark (beside the dense kernel)"
[ -x "$BUILD/test_topk_kernels" ] && timeout 60 "$BUILD/test_topk_kernels" --bench | tee -a "$OUT/bench_kernels.txt"

step "cuda vs triton per (dtype, C): backend='auto' table"
LEFT=$(left); [ "$LEFT" -lt 60 ] && LEFT=60
timeout "$LEFT" $PY benchmarks/gpu/measure_backend_choice.py --out-dir "$OUT" \
  || echo "measurement did not finish"

step "done: exit status $STATUS"
finish $STATUS
