#!/usr/bin/env bash
# DDP on every GPU of this machine (NCCL), then a resume on one GPU; and the
# no-host-synchronisation test of the fused loss. Run from the repository root after
# building the extension. Prints the run's metrics; exits non-zero on any failure.
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
OUT=${OUT:-runs/ddp_smoke}
rm -rf "$OUT"
echo "GPUs: $GPUS; torch $(python -c 'import torch; print(torch.__version__)')"
python -m pytest tests/test_distributed.py -q -k "synchronise or bf16"
torchrun --standalone --nproc_per_node="$GPUS" -m smskd_fast train-teacher --config configs/digits_demo.yaml \
    --device cuda --set teacher_training.epochs=3 --out "$OUT/teacher"
torchrun --standalone --nproc_per_node="$GPUS" -m smskd_fast train --config configs/digits_demo.yaml --device cuda \
    --set teacher.checkpoint="$OUT/teacher/student.pt" --set defaults.epochs=2 --set stages.2.epochs=3 --out "$OUT/smskd"
python - "$OUT/smskd" <<'PY'
import sys, torch
latest = torch.load(f"{sys.argv[1]}/checkpoints/latest.pt", weights_only=True)
assert latest["stage"] == 2, latest["stage"]
PY
# resume on one GPU (any world size works): rewinds nothing, just finishes the run again
torchrun --standalone --nproc_per_node=1 -m smskd_fast train --resume "$OUT/smskd"
cat "$OUT/smskd/metrics.jsonl"
