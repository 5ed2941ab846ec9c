"""What the GPU scripts in benchmarks/gpu/ count and keep, checked on the CPU with stand-ins for the profiler
(their GPU runs are run_all.sh's)."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import kernel_breakdown  # noqa: E402
import measure_backend_choice  # noqa: E402


def _event(name: str, device_type, us: float, annotation: bool = False) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=device_type, is_user_annotation=annotation, cpu_parent=None,
                           time_range=SimpleNamespace(elapsed_us=lambda: us))


def test_kernel_time_leaves_out_the_device_copy_of_inductors_graph_annotation(monkeypatch):
    """Inductor wraps each compiled graph call in a record_function; Kineto mirrors it on the GPU as a user
    annotation spanning the graph's kernels. Counted, it doubled the compiled row's device time."""
    calls = kernel_breakdown.PROFILED_CALLS
    events = [_event("## Call CompiledFxGraph fx1 ##", DeviceType.CUDA, 30.0 * calls, annotation=True),
              _event("triton_red_fused_0", DeviceType.CUDA, 20.0 * calls),
              _event("triton_poi_fused_1", DeviceType.CUDA, 10.0 * calls),
              _event("aten::mul", DeviceType.CPU, 99.0 * calls)]
    profiler = SimpleNamespace(events=lambda: events)
    monkeypatch.setattr(kernel_breakdown, "profile", lambda activities: contextlib.nullcontext(profiler))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    times = kernel_breakdown.kernel_times_ms(lambda: None, "cuda")
    assert times == pytest.approx({"triton_red_fused_0": 0.020, "triton_poi_fused_1": 0.010})


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """script after common.sh's preamble, with a tee that starts a second late (as a loaded machine's may)."""
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "tee").write_text(f'#!/bin/sh\nsleep 1\nexec {shutil.which("tee")} "$@"\n')
    (slow / "tee").chmod(0o755)
    # Output to a file, not a pipe: a pipe's reader would wait for tee, which holds the pipe open.
    with open(tmp_path / "stdout.txt", "w") as stdout:
        return subprocess.run(["bash", "-c", f"source benchmarks/gpu/common.sh test log.txt 60; {script}"],
                              cwd=ROOT, env={"OUT": str(tmp_path), "PATH": f"{slow}:/usr/bin:/bin"},
                              stdout=stdout, stderr=subprocess.STDOUT, timeout=60)


def test_finish_returns_once_the_log_holds_the_last_lines(tmp_path):
    """common.sh copies the output to the log through tee, which bash does not wait for at exit: the device tool
    ends the machine's processes when the command returns, so the end of run_all.log (the speed table) could be
    lost. finish waits for it, and keeps the exit status."""
    result = _run('for i in $(seq 2000); do echo "line $i"; done; finish 3', tmp_path)
    assert result.returncode == 3
    assert (tmp_path / "log.txt").read_text().splitlines()[-1] == "line 2000"



def _row(impl: str, c: int, ms=None, n: int = 8192, dtype: str = "bfloat16") -> dict:
    row = {"impl": impl, "N": n, "C": c, "dtype": dtype}
    row.update({"ms": ms} if ms is not None else {"error": "out of memory"})
    return row


def test_the_choice_table_takes_only_what_both_backends_were_timed_at():
    """A speed table cut by its deadline has cuda at a C where triton never ran: nothing was compared there,
    so no winner is recorded (it used to record the one measured backend as the measured winner)."""
    rows = [_row("cuda", 1000, 1.0), _row("triton", 1000, 0.5),         # both: triton
            _row("cuda", 32000, 2.0),                                   # triton not reached
            _row("cuda", 128256, None), _row("triton", 128256, 5.0),   # cuda failed: it loses
            _row("cuda_rowcache", 128256, 0.1), _row("eager", 1000, 0.1),  # not GPU backends of the choice
            _row("cuda", 512, 1.0, n=4096), _row("triton", 512, 0.6, n=4096),  # two N: totals 2.0 and 2.1
            _row("cuda", 512, 1.0, n=8192), _row("triton", 512, 1.5, n=8192)]
    timings = measure_backend_choice.bench_timings(rows)
    assert timings == {"bfloat16": {"1000": {"cuda": 1.0, "triton": 0.5},
                                    "128256": {"cuda": float("inf"), "triton": 5.0},
                                    "512": {"cuda": 2.0, "triton": 2.1}}}


def test_a_new_run_merges_into_the_devices_entry(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"devices": {"GPU A": {"bfloat16": {"1000": "cuda", "32000": "cuda"}},
                                               "GPU B": {"float32": {"1000": "triton"}}},
                                   "measured": {"GPU A": {"date": "2026-12-04", "commit": "e316647"},
                                                "GPU B": {"date": "2026-12-01"}}}))
    monkeypatch.setattr(measure_backend_choice.gpu_choice, "TABLE_PATH", str(shipped))
    bench = tmp_path / "speed_of_light.json"
    bench.write_text(json.dumps({"device": "GPU A", "torch": "2.11", "copy_GBps": 4250.0,
                                 "environment": {"commit": "abc1234", "triton": "3.6.0"},
                                 "rows": [_row("cuda", 1000, 1.0), _row("triton", 1000, 0.5),
                                          _row("cuda", 32000, 1.0)]}))
    assert measure_backend_choice.table_from_bench(str(bench), str(tmp_path / "out")) == 0
    table = json.loads((tmp_path / "out" / "gpu_choice_table.json").read_text())
    assert table["devices"] == {"GPU A": {"bfloat16": {"1000": "triton", "32000": "cuda"}},
                                "GPU B": {"float32": {"1000": "triton"}}}
    assert table["measured"]["GPU A"]["commit"] == "abc1234"
    assert table["measured"]["GPU A"]["earlier"] == {"date": "2026-12-04", "commit": "e316647", "source": None}
    assert table["measured"]["GPU B"] == {"date": "2026-12-01"}


def test_a_results_file_without_a_compared_point_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(measure_backend_choice.gpu_choice, "TABLE_PATH", str(tmp_path / "none.json"))
    bench = tmp_path / "bench_results.json"  # bench_grid.py's layout: its rows are under "grid"
    bench.write_text(json.dumps({"device": "GPU A", "grid": [_row("cuda", 1000, 1.0)]}))
    assert measure_backend_choice.table_from_bench(str(bench), str(tmp_path / "out")) == 1
    assert not (tmp_path / "out").exists()
