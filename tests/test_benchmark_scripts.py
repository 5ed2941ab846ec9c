"""The host-cost benchmarks run and count what they say they count (CPU; their GPU runs are in run_all.sh)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import host_overhead  # noqa: E402
import vmap_batching  # noqa: E402


def test_operation_counter_counts_kernels_not_views():
    x = torch.randn(4, 5)
    counter = host_overhead.OperationCounter()
    with counter:
        (x.view(-1) * 2 + 1).detach().sum()
    assert counter.names == ["aten::mul.Tensor", "aten::add.Tensor", "aten::sum"]


def test_host_overhead_measures_the_fused_loss_against_eager():
    chosen = {name: fn for name, fn in host_overhead.implementations("cpu").items() if name != "compiled"}
    rows = {row["impl"]: row for row in host_overhead.measure(chosen, 4, 8, torch.float32, "cpu", calls=3, batches=2)}
    assert set(rows) == {"smskd_fast[cpu]", "eager"}
    for row in rows.values():
        assert 0 < row["us_min"] <= row["us_per_call"] <= row["us_max"]
    # The fused op is one operation where the composition has one per softmax, product and sum.
    assert rows["smskd_fast[cpu]"]["ops"].count("smskd_fast::smskd_loss_rows") == 1
    assert rows["smskd_fast[cpu]"]["ops_per_call"] < rows["eager"]["ops_per_call"]


def test_vmap_batching_compares_equal_losses():
    """vmap and the loop it is compared with compute the same per-sample means (shared and per-sample
    teachers); each implementation's row has its times."""
    steps = vmap_batching.implementations("cpu")
    generator = torch.Generator().manual_seed(0)
    students = torch.randn(3, 4, 9, generator=generator)
    targets = torch.randint(0, 9, (3, 4), generator=generator)
    for frozen_shape in ((4, 9), (3, 4, 9)):
        teachers, references = torch.randn(frozen_shape, generator=generator), torch.randn(frozen_shape)
        torch.testing.assert_close(steps["vmap"](students, targets, teachers, references),
                                   steps["sample by sample"](students, targets, teachers, references))
    rows = vmap_batching.measure(steps, (3, 4, 9, True), torch.float32, "cpu", calls=2, batches=2)
    assert [row["impl"] for row in rows] == list(steps)
    for row in rows:
        assert row["case"] == "3 x 4 x 9 shared" and 0 < row["us_min"] <= row["us_per_call"] <= row["us_max"]


def test_kernel_breakdown_dry_run(tmp_path):
    """--dry-run (CPU, Triton interpreted): every implementation gets a row with its time split."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "benchmarks/gpu/kernel_breakdown.py", "--dry-run", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "kernel_breakdown.json").read_text())["rows"]
    assert {row["impl"] for row in rows} == {"smskd_fast[cpu]", "eager", "compiled"}
    for row in rows:
        assert "error" not in row, row
        assert row["kernels"] > 0 and 0 < row["device_ms"] and 0 < row["wall_ms"]
