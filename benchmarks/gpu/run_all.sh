#!/usr/bin/env bash
# One command for a fresh GPU machine (torch >= 2.11, triton, Python 3.12, no network), in
# at most 9.5 minutes (RUN_ALL_SECONDS, default 560) including the build; give the device tool
# timeout_s 600:
#
#   OUT=/some/folder SMSKD_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu/run_all.sh
#
# (the device tool copies the tree without .git, so name the commit in SMSKD_COMMIT; pass
# carry=[".whl"] so that the wheels in .whl/ travel: .whl/ is git-ignored.)
# 1. builds smskd_fast._C in place for this GPU's architecture only (TORCH_CUDA_ARCH_LIST from
#    the device, which setup.py turns into its -gencode flags; MAX_JOBS=16);
# 2. runs EVERY test in tests/ (GPU files first, then the rest) under pytest-xdist when the
#    machine has it, each test time-boxed (SMSKD_TEST_TIMEOUT, default 180 s) by tests/run_guard.py,
#    which also appends one line per test outcome, with the failure's first lines, to
#    $OUT/test_progress.txt as the run goes: a run cut by the time box still says what failed
#    and why. The whole pytest step gets SIGINT at its budget (all but BENCH_SECONDS, default 270),
#    so the junit file is still written;
# 3. issue 17's speed table (benchmarks/gpu/speed_of_light.py: cuda, triton and torch.compile at every
#    shape first, then Liger, eager, top-k and the candidates; % of copy bandwidth, missed targets)
#    in all but ~120 s of what is left;
# 4. benchmarks/gpu/backward_skip.py (<= 25 s): fwd+bwd of the mean with grad_output 1 against 0.5,
#    i.e. what folding the mean's 1/n into the forward gradient saves, in one run;
# 5. benchmarks/gpu/kernel_breakdown.py (<= 40 s): each call's kernels' device time against its wall
#    time, kernels per call, the longest kernels (kernel_breakdown.json; its table in run_all.log);
# 6. benchmarks/host_overhead.py --device cuda (the rest, <= 60 s): host time and operations per call
#    of a forward+backward too small for the kernels to matter, against eager and torch.compile (its
#    table goes to run_all.log: the device tool returns at most 8 files).
# Writes to $OUT (default benchmarks/results/gpu_<date>), 8 files (the device tool returns at
# most 8): run_all.log, test_progress.txt, tests.xml, backward_skip.{json,md}, kernel_breakdown.json,
# speed_of_light.{json,md}.
# (benchmarks/gpu/bench_grid.py, the wider grid with the online-config sweep, runs on its own.) Wheels in .whl/ are installed to /tmp/site first: expecttest (for
# torch.testing helpers that import it; opcheck itself does not), liger-kernel (the Liger
# column of the table). Fill .whl/ on a machine with an index:
#   pip download --no-deps -d .whl expecttest==0.3.0 liger-kernel==0.8.5
# A failed step does not stop the later ones; the exit status is pytest's (0: every test passed).
set -uo pipefail
source "$(dirname "$0")/common.sh" gpu run_all.log "${RUN_ALL_SECONDS:-560}"
PROGRESS="$OUT/test_progress.txt"
BENCH_SECONDS=${BENCH_SECONDS:-270}  # kept after the tests: the speed table, backward_skip, kernel_breakdown, host_overhead

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
$PY -c "import setuptools; print('setuptools', setuptools.__version__)" || echo "setuptools missing: setup.py cannot build"
echo "commit ${SMSKD_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$GPU" = 1 ]; then
  ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  echo "device $($PY -c "import torch; print(torch.cuda.get_device_name())"), compute capability $ARCH"
else
  ARCH=""
  echo "no CUDA device: the GPU tests skip and the speed table is not run (a dry run of the script)"
fi
$PY -c "import xdist; print('pytest-xdist', xdist.__version__)" 2>/dev/null || echo "no pytest-xdist: tests run in one process"

step "wheels from .whl/"
if compgen -G ".whl/*.whl" > /dev/null; then
  ls -la .whl/
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "none (carry .whl/): the Liger column is skipped"
fi
$PY -c "import expecttest" 2>/dev/null && echo "expecttest importable" || echo "expecttest missing (opcheck does not need it)"

step "build the extension in place (${ARCH:-no GPU: CPU part only}; at most 240 s)"
if [ -n "$ARCH" ]; then
  if ! TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-16} timeout 240 $PY setup.py build_ext --inplace -q; then
    echo "CUDA build failed or timed out: building without CUDA (the cuda backend is then skipped)"
    SMSKD_FAST_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout 120 $PY setup.py build_ext --inplace -q \
      || echo "CPU-only build failed too"
  fi
else
  SMSKD_FAST_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-4} timeout 600 $PY setup.py build_ext --inplace -q || echo "CPU build failed"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # child processes of the tests import this tree
show_backends

step "every test in tests/, GPU files first (per test ${SMSKD_TEST_TIMEOUT:-180} s; progress in $PROGRESS)"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-12}" || echo "")
# -p no:benchmark: no test uses pytest-benchmark's fixture, and under xdist it only warns once per worker.
# Workers share the 16 cores: 2 intra-op threads each, inductor compiling in-process (its default
# pool would start a process per core in every worker).
# (set for the pytest command only: the benchmarks after it compile with inductor's default pool)
TEST_ENV="OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}"
GPU_FILES="tests/test_backend_conformance.py tests/test_cuda_backend.py tests/test_cuda_topk.py tests/test_triton_backend.py tests/test_triton_topk.py
  tests/test_topk.py tests/test_overwrite_student_logits.py tests/test_gpu_choice.py tests/test_fused_linear.py
  tests/test_cuda_resources.py tests/test_cuda_row_math_host.py tests/test_cuda_topk_host_math.py
  tests/test_distributed.py tests/test_triton_aot.py tests/test_validation.py tests/test_properties.py
  tests/test_loss_sync.py tests/test_grad_scale.py tests/test_eager_autograd.py tests/test_op_reduction.py
  tests/test_cuda_row_cache.py tests/test_non_finite.py tests/test_triton_maximum.py
  tests/test_fused_linear_sync.py tests/test_fused_linear_autograd.py tests/test_triton_op_checks.py
  tests/test_triton_compile_options.py tests/test_func_transforms.py tests/test_grad_scale_triton.py
  tests/test_backward_semantics.py tests/test_derivative_modes.py tests/test_vmap_rules.py
  tests/test_triton_symbolic_shapes.py"
BUDGET=$(( $(left) - BENCH_SECONDS ))
[ -z "$ARCH" ] && BUDGET=${DRY_RUN_TEST_SECONDS:-$BUDGET}
if [ "$BUDGET" -gt 30 ]; then
  # SIGINT (not TERM): pytest then stops like a Ctrl-C, reports and writes the junit file.
  env $TEST_ENV SMSKD_TEST_TIMEOUT=${SMSKD_TEST_TIMEOUT:-180} SMSKD_TEST_PROGRESS="$PROGRESS" SMSKD_TEST_FIRST="$GPU_FILES" \
    timeout -s INT -k 20 "$BUDGET" $PY -m pytest tests -q -p no:cacheprovider -p no:benchmark -rfE --tb=short $XDIST \
    --junitxml="$OUT/tests.xml"
  TESTS=$?
  [ "$TESTS" = 124 ] && echo "the test step reached its ${BUDGET} s budget: see $PROGRESS for what ran"
else
  echo "skipped: ${BUDGET} s left for the tests"
  TESTS=1
fi
echo "pytest exit status: $TESTS"
echo "outcomes per file (from $PROGRESS):"
awk '$1 !~ /^#/ { split($4, id, "::"); n[id[1] " " $1]++ } END { for (k in n) print n[k], k }' "$PROGRESS" 2>/dev/null \
  | sort -k2,2 -k3,3 | awk '{ printf "  %-45s %-8s %5d\n", $2, $3, $1 }'
grep -E "^(FAILED|ERROR)" "$PROGRESS" 2>/dev/null | cut -c1-400 | head -n 60

step "speed table (benchmarks/gpu/speed_of_light.py; fused and torch.compile first, all but ~120 s of what is left)"
if [ -n "$ARCH" ]; then
  DEADLINE=$(( $(left) - 120 )); [ "$DEADLINE" -lt 60 ] && DEADLINE=60
  timeout -k 5 $(( DEADLINE + 20 )) $PY benchmarks/gpu/speed_of_light.py --out "$OUT" --deadline "$DEADLINE" \
    || echo "benchmark failed or timed out (partial results are in $OUT)"
else
  echo "skipped: no GPU (benchmarks/gpu/speed_of_light.py --dry-run runs it on the CPU)"
fi

step "what the fold of the mean's 1/n saves (benchmarks/gpu/backward_skip.py, <= 25 s)"
if [ -n "$ARCH" ]; then
  timeout -k 5 45 $PY benchmarks/gpu/backward_skip.py --out "$OUT" --deadline 25 || echo "backward_skip failed or timed out"
else
  echo "skipped: no GPU (benchmarks/gpu/backward_skip.py --dry-run runs it on the CPU)"
fi

step "kernel time against call time (benchmarks/gpu/kernel_breakdown.py, <= 40 s)"
if [ -n "$ARCH" ] && [ "$(left)" -gt 50 ]; then
  timeout -k 5 70 $PY benchmarks/gpu/kernel_breakdown.py --out "$OUT" --deadline 40 \
    || echo "kernel_breakdown failed or timed out"
else
  echo "skipped: no GPU or no time (benchmarks/gpu/kernel_breakdown.py --dry-run runs it on the CPU)"
fi

step "host cost per call (benchmarks/host_overhead.py, the rest, <= 60 s)"
if [ -n "$ARCH" ] && [ "$(left)" -gt 30 ]; then
  timeout -k 5 $(( $(left) < 60 ? $(left) : 60 )) $PY benchmarks/host_overhead.py --device cuda --calls 200 --batches 10 \
    || echo "host_overhead failed or timed out"
else
  echo "skipped: no GPU or no time (python benchmarks/host_overhead.py runs it on the CPU)"
fi

step "done"
ls -la "$OUT"
finish "$TESTS"
