#!/usr/bin/env bash
# Issue 11 on a GPU: peak memory and time of forward + backward of fused_linear_smskd_loss against the
# unfused composition (materialised logits + smskd_loss) at full size: B*L = 8192 tokens, hidden 2048,
# vocabulary 32000 and 128256, bf16, row backend triton (BACKEND=auto or cuda to change it; when triton
# cannot run, the script says why and uses auto). The SMSKD form has student, teacher and reference
# heads; the KD-only form (student + teacher) is also timed against Liger's LigerFusedLinearJSD
# (jsd_beta=0, i.e. KL(teacher || student)) when its wheel is carried in .whl/ (liger_kernel-*.whl).
# Targets (issue 11): fused peak memory <= 1/4 of unfused at vocab 128256, time <= 1.1x.
# Writes fused_linear_gpu_bf16.{json,md}, the device and backend status into $OUT
# (default benchmarks/results).
#   bash benchmarks/gpu/fused_linear.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-benchmarks/results}
backend=${BACKEND:-triton}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ date -u; git rev-parse HEAD 2>/dev/null || true; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
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
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  pip install --no-deps --quiet --target /tmp/liger_site .whl/liger_kernel-*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/liger_site
  variants="$variants liger_jsd"
else
  echo "no .whl/liger_kernel-*.whl: Liger is left out" | tee -a "$out/fused_linear_gpu_env.txt"
fi
python benchmarks/fused_linear_memory.py --device cuda --backend "$backend" --tokens 8192 --hidden 2048 \
  --vocab 32000 128256 --dtype bfloat16 --repeats 10 --variants $variants --out "$out/fused_linear_gpu_bf16"
