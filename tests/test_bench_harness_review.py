"""The microbenchmarks measure what they say and keep what they measure: torch.compile cases that
compile, CUDA timings that wait for the device, peaks of the step alone, arguments refused by name,
results never overwritten nor half written, provenance recorded, comparisons interleaved. CPU only."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from smskd_fast.backends.base import BackendStatus
from smskd_fast.bench import harness, quick
from smskd_fast.bench.harness import MODES

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cpu_loss_table  # noqa: E402
import fused_linear_memory  # noqa: E402
import host_overhead  # noqa: E402


class FakeBenchmark:
    """pytest-benchmark's fixture, as bench_cpu_loss uses it: pedantic runs the warm-up and the rounds."""

    def __init__(self) -> None:
        self.group = None
        self.extra_info: dict = {}
        self.calls = 0

    def pedantic(self, fn, rounds: int, iterations: int, warmup_rounds: int) -> None:
        for _ in range(warmup_rounds + rounds * iterations):
            fn()
            self.calls += 1


@pytest.fixture
def fresh_dynamo():
    harness.reset_compilation()
    yield
    harness.reset_compilation()


def test_pytest_benchmark_suite_compiles_each_case_afresh(fresh_dynamo):
    """bench_cpu_loss's torch.compile cases: the default grid has 16 (shape, dtype, mode) cases and
    dynamo's recompile limit is 8, so from the 9th on fullgraph=True failed. With the limit lowered to 1
    a second case shows it."""
    bench_cpu_loss = importlib.import_module("bench_cpu_loss")
    # config.patch, not monkeypatch: monkeypatch's undo deleted the option from dynamo's config module
    # (torch.compile in every later test of the process then failed: "recompile_limit does not exist")
    with torch._dynamo.config.patch(recompile_limit=1):
        for shape in ((4, 6), (4, 7)):
            for mode in MODES:
                benchmark = FakeBenchmark()
                bench_cpu_loss.test_cpu_loss(benchmark, shape, torch.float32, mode, "torch.compile")
                assert benchmark.calls == 11 and benchmark.group == f"4x{shape[1]}-float32-{mode}"


@pytest.mark.parametrize("argv, argument", [
    (["--repeats", "0"], "--repeats"), (["--repeats", "x"], "--repeats"), (["--device", "foo"], "--device"),
    (["--device", "meta"], "--device")])
def test_quick_refuses_bad_arguments_by_name(argv, argument, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quick.main(argv)
    assert exit_info.value.code == 2
    assert f"argument {argument}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_quick_refuses_cuda_without_a_device(capsys):
    with pytest.raises(SystemExit):
        quick.main(["--device", "cuda:0"])
    assert "argument --device: 'cuda:0': no CUDA device is visible" in capsys.readouterr().err


def test_quick_waits_for_any_cuda_device(monkeypatch):
    """--device cuda:1 is a CUDA device: each timed step synchronises it (before: only the string "cuda" did,
    so cuda:N timed the launches) and the CUDA backend is among those timed, the C++ CPU one is not."""
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    student = torch.ones(2, 3, requires_grad=True)
    step = quick.timed_step(lambda: (student * 2).sum(), student, torch.device("cuda:1"))
    step()
    step()
    assert waited == [torch.device("cuda:1")] * 2 and student.grad.eq(2).all()
    quick.timed_step(lambda: (student * 2).sum(), student, torch.device("cpu"))()
    assert len(waited) == 2
    everything = {name: BackendStatus(True, "test") for name in ("cpu", "triton", "cuda", "reference")}
    monkeypatch.setattr(quick, "available_backends", lambda: everything)
    assert quick.backends_for(torch.device("cuda:1")) == ["triton", "cuda", "reference"]
    assert quick.backends_for(torch.device("cpu")) == ["cpu", "triton", "reference"]


def test_quick_table_records_where_and_with_what(monkeypatch):
    monkeypatch.setenv("SMSKD_COMMIT", "abc1234")
    table = quick.format_table([((4, 8), [("eager torch.nn.functional", 2e-3), ("smskd_fast[cpu]", 1e-3)])],
                               torch.float32, torch.device("cpu"))
    assert f"torch {torch.__version__}" in table and "triton " in table and "commit abc1234" in table
    assert harness.device_name("cpu") in table and " UTC" in table
    assert "|    2.00x |" in table and "|      1.00 |" in table  # ms from seconds, speed-up vs eager


def test_fused_linear_memory_peak_is_the_steps_own():
    """On the CPU the peak resident size since the process began counted as the step's: a peak reached
    before the inputs existed (here a freed 64 MiB buffer; in a run, the float32 draws and casts that
    create the weights) stood for the step's peak."""
    big = torch.ones(16 << 20)  # 64 MiB, mapped on its own and returned when freed
    del big
    row = fused_linear_memory.measure("unfused", 4, 8, 16, "float32", "cpu", 1, backend="cpu")
    assert 0 <= row["peak_extra_bytes"] < 16 << 20


@pytest.mark.parametrize("argv, argument", [
    (["--device", "cuda:0"], "--device"), (["--dtype", "float23"], "--dtype"), (["--repeats", "0"], "--repeats"),
    (["--tokens", "-4"], "--tokens"), (["--chunk-size", "-1"], "--chunk-size"), (["--backend", "nope"], "--backend")])
def test_fused_linear_memory_refuses_bad_arguments_by_name(argv, argument, monkeypatch, capsys):
    small = ["--variants", "unfused", "--tokens", "4", "--hidden", "4", "--vocab", "8"]
    monkeypatch.setattr(sys, "argv", ["fused_linear_memory.py", *small, *argv])
    with pytest.raises(SystemExit) as exit_info:
        fused_linear_memory.main()
    assert exit_info.value.code == 2
    assert f"argument {argument}" in capsys.readouterr().err


SMALL_TABLE = ["--shapes", "4x8", "--dtypes", "float32", "--modes", "forward", "--methods", "smskd_fast",
               "--repeats", "1", "--no-memory"]


@pytest.mark.parametrize("change, argument", [
    ({"--shapes": "0x8"}, "--shapes"), ({"--shapes": "4096"}, "--shapes"), ({"--shapes": "4xk"}, "--shapes"),
    ({"--dtypes": "float23"}, "--dtypes"), ({"--repeats": "0"}, "--repeats"), ({"--methods": "eager"}, "--methods")])
def test_cpu_loss_table_refuses_bad_arguments_by_name(change, argument, tmp_path, capsys):
    argv = list(SMALL_TABLE)
    for option, value in change.items():
        argv[argv.index(option) + 1] = value
    with pytest.raises(SystemExit) as exit_info:
        cpu_loss_table.main(argv + ["--out-dir", str(tmp_path), "--name", "t"])
    assert exit_info.value.code == 2
    assert f"argument {argument}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cpu_loss_table_keeps_older_results(tmp_path):
    """--name of an existing result is refused before anything is measured; the old file is kept."""
    (tmp_path / "t.json").write_text("older results")
    with pytest.raises(SystemExit, match="t.json exists"):
        cpu_loss_table.main(SMALL_TABLE + ["--out-dir", str(tmp_path), "--name", "t"])
    assert (tmp_path / "t.json").read_text() == "older results" and not (tmp_path / "t.md").exists()


def test_write_results_records_environment_and_refuses_existing(tmp_path, monkeypatch):
    monkeypatch.setenv("SMSKD_COMMIT", "abc1234")
    out = tmp_path / "sub" / "run"
    harness.write_results(out, "header", "| table |", [{"x": 1}])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["results"] == [{"x": 1}] and data["header"] == "header"
    environment = data["environment"]
    assert environment["commit"] == "abc1234" and environment["torch"] == torch.__version__
    assert environment["device"] == "cpu" and environment["device_name"] and environment["date"].endswith("UTC")
    assert set(environment) >= {"triton", "python", "torch_threads"}
    assert "| table |" in out.with_suffix(".md").read_text()
    with pytest.raises(FileExistsError, match="run.json exists"):
        harness.write_results(out, "header", "| other |", [])
    assert "| table |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("write", ["harness", "host_overhead", "cpu_loss_table"])
def test_result_files_are_written_all_or_none(write, tmp_path):
    """A write that fails part-way (here the table cannot be encoded) leaves neither file, nor a temporary
    one: before, the JSON stayed without its table, and the table file empty."""
    out = tmp_path / "run"
    bad = "| \ud800 |"
    with pytest.raises(UnicodeEncodeError):
        if write == "harness":
            harness.write_results(out, "header", bad, [])
        elif write == "host_overhead":
            host_overhead.write_outputs(out, bad, {"rows": []})
        else:
            cpu_loss_table.write_new_files({str(out) + ".json": "{}", str(out) + ".md": bad})
    assert list(tmp_path.iterdir()) == []


def test_host_overhead_refuses_existing_output_before_running(tmp_path, monkeypatch, capsys):
    (tmp_path / "run.md").write_text("older")
    monkeypatch.setattr(sys, "argv", ["host_overhead.py", "--out", str(tmp_path / "run")])
    monkeypatch.setattr(host_overhead, "measure", lambda *args: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit):
        host_overhead.main()
    assert "argument --out" in capsys.readouterr().err and (tmp_path / "run.md").read_text() == "older"


def test_host_overhead_interleaves_the_implementations_batches():
    """Each round runs one batch of every implementation, so that a change of load hits all alike
    (before: all batches of one implementation, then all of the next)."""
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    timing = host_overhead.interleaved_per_call_us(steps, "cpu", calls=2, batches=3)
    assert calls[:20] == ["a"] * 10 + ["b"] * 10  # the warm-up
    assert calls[20:] == ["a", "a", "b", "b"] * 3
    for figures in timing.values():
        assert 0 < figures["us_min"] <= figures["us_per_call"] <= figures["us_max"]
