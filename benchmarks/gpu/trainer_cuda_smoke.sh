#!/usr/bin/env bash
# GPU smoke check of the trainer (run on a machine with CUDA): the digits demo on cuda, then one
# short epoch of the CIFAR-100 resnet32x4 -> resnet8x4 recipe (all three stages) on synthetic
# files in the real CIFAR-100 format. Prints the accuracy table and the run summary.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:-/tmp/smskd_trainer_gpu}
rm -rf "$work"; mkdir -p "$work"
python -m smskd_fast demo --device cuda --out "$work/demo"
python - "$work/data" <<'PY'
import pickle, sys
from pathlib import Path
import numpy as np
folder = Path(sys.argv[1]) / "cifar-100-python"
folder.mkdir(parents=True)
rng = np.random.default_rng(0)
for split, count in (("train", 512), ("test", 256)):
    entry = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
             "fine_labels": rng.integers(0, 100, count).tolist()}
    pickle.dump(entry, open(folder / split, "wb"))
PY
config=configs/cifar100_resnet32x4_resnet8x4.yaml
python -m smskd_fast train-teacher --config $config --data-dir "$work/data" --out "$work/teacher" \
  --set teacher_training.epochs=1
python -m smskd_fast train --config $config --data-dir "$work/data" --out "$work/student" \
  --set teacher.checkpoint="$work/teacher/student.pt" --set stages.0.epochs=1 --set stages.1.epochs=1 \
  --set stages.2.epochs=1
cat "$work/student/summary.json"
