#!/usr/bin/env bash
# Issue 18 on a GPU, one command: time and peak memory of forward + backward of fused_linear_smskd_loss
# against the unfused composition (materialised logits + smskd_loss) and Liger's LigerFusedLinearJSD
# (jsd_beta=0: KL(teacher || student), no CE; taken when liger_kernel imports or its wheel is carried in
# .whl/liger_kernel-*.whl) at B*L = 8192 tokens x hidden {2048, 4096} x vocabulary {32000, 128256}, bf16:
# the SMSKD form (student, teacher and reference heads) and the KD-only form (student and teacher).
# Row backend: auto (BACKEND=triton or cuda to force one; when it cannot run, the script says why and
# uses auto). Targets (issue 18): fused <= 1.05x the unfused time and <= 1/4 its peak memory at every
# shape and form, and faster than liger_jsd. SWEEP=1 adds a chunk-size sweep at 4096 x 128256.
# Writes fused_linear_gpu_env.txt and fused_linear_gpu_bf16.{json,md} (fused_linear_gpu_sweep_c*.* with
# SWEEP=1) into $OUT (default benchmarks/results).
#   bash benchmarks/gpu/fused_linear.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-benchmarks/results}
backend=${BACKEND:-auto}
repeats=${REPEATS:-5}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python -c "import smskd_fast._C" 2>/dev/null; then  # a bare machine: build in place (CUDA, else CPU-only)
  arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || true)
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${arch:-8.0;9.0}} MAX_JOBS=${MAX_JOBS:-16} timeout 240 \
    python setup.py -q build_ext --inplace \
    || SMSKD_FAST_NO_CUDA=1 python setup.py -q build_ext --inplace || echo "no build: the cuda/cpu backends are off"
fi
{ date -u; git rev-parse HEAD 2>/dev/null || echo "commit ${SMSKD_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python -c "from smskd_fast.backends import available_backends as a; [print(k, v) for k, v in a().items()]"
} > "$out/fused_linear_gpu_env.txt" 2>&1
cat "$out/fused_linear_gpu_env.txt"
if [ "$backend" != auto ] && ! python -c "
import sys, torch
from smskd_fast.backends import get_backend
get_backend(sys.argv[1], torch.device('cuda'))" "$backend"; then
  echo "backend $backend cannot run here (see above); using auto" | tee -a "$out/fused_linear_gpu_env.txt"
  backend=auto
fi
variants="unfused fused unfused_kd fused_kd"
if python -c "import liger_kernel" 2>/dev/null; then
  variants="$variants liger_jsd"
elif ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  python -m pip install --no-index --no-deps --quiet --target /tmp/liger_site .whl/liger_kernel-*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/liger_site
  variants="$variants liger_jsd"
else
  echo "liger_kernel does not import and no .whl/liger_kernel-*.whl: Liger is left out" \
    | tee -a "$out/fused_linear_gpu_env.txt"
fi
python benchmarks/fused_linear_memory.py --device cuda --backend "$backend" --tokens 8192 --hidden 2048 4096 \
  --vocab 32000 128256 --dtype bfloat16 --repeats "$repeats" --variants $variants --out "$out/fused_linear_gpu_bf16"
if [ "${SWEEP:-0}" = 1 ]; then
  for chunk in 256 512 2048; do
    python benchmarks/fused_linear_memory.py --device cuda --backend "$backend" --tokens 8192 --hidden 4096 \
      --vocab 128256 --dtype bfloat16 --repeats "$repeats" --variants fused fused_kd --chunk-size "$chunk" \
      --out "$out/fused_linear_gpu_sweep_c$chunk"
  done
fi
