"""Kill -9 at random and at chosen points of training, then resume; a full disk during a checkpoint write.

Every kill is followed by a check of the run directory (each checkpoint loads, each JSON and YAML
file parses) and by `smskd-fast train --resume`; the run that finishes after all the kills must
have exactly the weights and per-epoch losses of a run never interrupted (bit-identical on CPU).
SMSKD_FAULT_KILLS sets the number of random kills (default 6; the reliability table used more).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from smskd_fast.training import atomic_io
from smskd_fast.training import checkpoint
from smskd_fast.cli import main
from smskd_fast.training.config import load_config
from smskd_fast.training.run_files import read_jsonl
from smskd_fast.training.trainer import SMSKDTrainer
from trainer_helpers import DiskFullAfter, tiny_raw, write_teacher

ROOT = Path(__file__).resolve().parent.parent
STAGES = [{"method": "kd", "epochs": 3}, {"method": "sp", "epochs": 3}]  # stage 2 has a reference
EPOCHS = 6
SECONDS_PER_EPOCH = 0.15  # about, on a busy 2-core machine: random kills are drawn over the work left
RANDOM_KILLS = int(os.environ.get("SMSKD_FAULT_KILLS", "6"))

# Runs the CLI in a child process after arming one fault: "timer:SECONDS" sends SIGKILL to the
# process that many seconds after the imports (a random moment of training), the other points
# kill it at one chosen place of the run's file writes.
DRIVER = textwrap.dedent('''
    import os, signal, sys, threading
    import torch._dynamo  # what torch.optim imports on first use (seconds): import it before the timer starts
    import smskd_fast.training.atomic_io as atomic_io, smskd_fast.training.trainer as stages
    from smskd_fast.cli import main

    point, argv = sys.argv[1], sys.argv[3:]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_mid_write(suffix):
        original = atomic_io._WriteRecorder.write
        def write(self, data):
            self.calls = getattr(self, "calls", 0) + 1
            if self.handle.name.endswith(suffix) and (self.calls >= 2 or len(data) > 64):
                self.handle.write(bytes(data[: max(1, len(data) // 2)]))
                self.handle.flush()
                die()
            return original(self, data)
        atomic_io._WriteRecorder.write = write

    if point.startswith("timer:"):
        timer = threading.Timer(float(point[6:]), die)
        timer.daemon = True  # a run that finishes first exits normally
        timer.start()
    elif point.startswith("mid-write:"):
        kill_mid_write(point[10:] + ".tmp")
    elif point.startswith("before-rename:"):
        target, replace = point[14:], os.replace
        def rename(source, destination):
            if str(destination).endswith(target):
                die()
            return replace(source, destination)
        os.replace = rename
    elif point == "after-metrics":  # epoch's metrics line written, latest.pt not yet
        append = stages.append_jsonl
        def append_then_die(path, record):
            append(path, record)
            die()
        stages.append_jsonl = append_then_die
    elif point == "mid-metrics":  # half a metrics line on disk, no newline
        def half_line(path, record):
            with open(path, "a") as handle:
                line = __import__("json").dumps(record)
                handle.write(line[: len(line) // 2])
            die()
        stages.append_jsonl = half_line
    raise SystemExit(main(argv))
''')


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    teacher = write_teacher(folder / "teacher.pt")
    config_file = folder / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_raw(teacher, STAGES)))
    driver = folder / "driver.py"
    driver.write_text(DRIVER)
    trainer = SMSKDTrainer(load_config(config_file), folder / "uninterrupted", log=lambda _: None)
    trainer.run()
    expected = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    losses = [r["train_loss"] for r in read_jsonl(folder / "uninterrupted" / "metrics.jsonl")]
    return config_file, driver, expected, losses


def _command(config_file: Path, run_dir: Path):
    """What a user runs next: resume a started run, or start one that never wrote its config."""
    if (run_dir / "config.yaml").is_file():
        return ["train", "--resume", str(run_dir)]
    return ["train", "--config", str(config_file), "--out", str(run_dir)]


def _run(driver: Path, point: str, argv):
    environment = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(driver), point, "--", *argv], capture_output=True, text=True,
                          env=environment, timeout=300)


def _check_readable(run_dir: Path) -> None:
    """Nothing a reader opens is ever half-written (a *.tmp file may be left; nothing reads it)."""
    for path in sorted(run_dir.rglob("*.pt")):
        torch.load(path, weights_only=True)
    for path in sorted(run_dir.glob("*.json")):
        json.loads(path.read_text())
    if (run_dir / "config.yaml").is_file():
        load_config(run_dir / "config.yaml")
    read_jsonl(run_dir / "metrics.jsonl")


def _check_final(run_dir: Path, expected, losses) -> None:
    state = torch.load(run_dir / "student.pt", weights_only=True)["state_dict"]
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["global_epoch"] for r in records] == list(range(1, EPOCHS + 1))
    assert [r["train_loss"] for r in records] == losses
    assert not list(run_dir.rglob("*.tmp"))
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == EPOCHS


def _finish(config_file, driver, run_dir):
    finished = _run(driver, "none", _command(config_file, run_dir))
    assert finished.returncode == 0, finished.stderr


# Each point, in the order a run reaches them, with what it leaves on disk.
POINTS = [
    ("mid-write:config.yaml", lambda d: not (d / "config.yaml").exists()),
    ("after-metrics", lambda d: len(read_jsonl(d / "metrics.jsonl")) == 1 and not (d / "checkpoints/latest.pt").exists()),
    ("mid-write:latest.pt", lambda d: (d / "checkpoints/latest.pt.tmp").stat().st_size > 0),
    ("mid-metrics", lambda d: not (d / "metrics.jsonl").read_text().endswith("\n")),
    ("before-rename:stage1.pt", lambda d: not (d / "checkpoints/stage1.pt").exists()
     and torch.load(d / "checkpoints/latest.pt", weights_only=True)["epochs_done"] == 3),
    ("mid-write:student.pt", lambda d: (d / "student.pt.tmp").is_file() and not (d / "student.pt").exists()),
    ("mid-write:summary.json", lambda d: (d / "student.pt").is_file() and not (d / "summary.json").exists()),
]


def test_kill_at_each_write_point_then_resume(setup, tmp_path):
    config_file, driver, expected, losses = setup
    run_dir = tmp_path / "run"
    for point, left_on_disk in POINTS:
        killed = _run(driver, point, _command(config_file, run_dir))
        assert killed.returncode == -9, f"{point} was not reached: {killed.stderr[-2000:]}"
        assert left_on_disk(run_dir), point
        _check_readable(run_dir)
    _finish(config_file, driver, run_dir)
    _check_final(run_dir, expected, losses)


def test_kill_at_random_moments_then_resume(setup, tmp_path):
    config_file, driver, expected, losses = setup
    run_dir = tmp_path / "run"
    chooser = random.Random(int(os.environ.get("SMSKD_FAULT_SEED", "0")))
    kills = finished = 0
    landed = {}  # where the kills landed: the last epoch on disk, and whether a file was being written
    while kills < RANDOM_KILLS:
        delay = chooser.uniform(0.0, SECONDS_PER_EPOCH * (EPOCHS + 1 - _epochs_done(run_dir)))
        started = time.time()
        result = _run(driver, f"timer:{delay:.3f}", _command(config_file, run_dir))
        _check_readable(run_dir)
        if result.returncode == -9:
            kills += 1
            where = _landing(run_dir, started)
            landed[where] = landed.get(where, 0) + 1
            continue
        assert result.returncode == 0, result.stderr
        finished += 1
        _check_final(run_dir, expected, losses)
        run_dir = tmp_path / f"run{finished}"  # a finished run: start another one to place more kills
    if (run_dir / "config.yaml").is_file() or not finished:
        _finish(config_file, driver, run_dir)
        _check_final(run_dir, expected, losses)
    print(f"\n{kills} random kills, {finished + 1} runs finished identical; kills landed: {sorted(landed.items())}")
    if RANDOM_KILLS >= 5:  # the kills must reach into training, not all land before the first checkpoint
        assert any(where.startswith("after epoch") and not where.startswith("after epoch 0") for where in landed), landed


def _epochs_done(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest.pt"
    return torch.load(latest, weights_only=True)["global_epoch"] if latest.is_file() else 0


def _landing(run_dir: Path, started: float) -> str:
    if not (run_dir / "config.yaml").is_file():
        return "before config.yaml"
    epochs = _epochs_done(run_dir)
    writing = sorted(p.name for p in run_dir.rglob("*.tmp") if p.stat().st_mtime >= started)
    return f"after epoch {epochs}" + (f", mid-write of {writing[0]}" if writing else "")


def test_kill_9_of_the_real_command_then_resume(setup, tmp_path):
    """The plain `python -m smskd_fast train`, killed from outside once its run has started."""
    config_file, driver, expected, losses = setup
    run_dir = tmp_path / "run"
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-m", "smskd_fast", "train", *_command(config_file, run_dir)[1:]],
                             env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.kill()  # SIGKILL
    child.wait()
    _check_readable(run_dir)
    _finish(config_file, driver, run_dir)
    _check_final(run_dir, expected, losses)


@pytest.mark.parametrize("target, after_epochs, budget, previous", [
    ("checkpoints/latest.pt", 1, 4096, True),   # the per-epoch checkpoint
    ("checkpoints/stage1.pt", 2, 4096, False),  # the stage checkpoint at the stage boundary
    ("summary.json", 5, 40, False),             # the summary at the very end
])
def test_full_disk_keeps_the_previous_file_and_resume_finishes(setup, tmp_path, monkeypatch, capsys,
                                                               target, after_epochs, budget, previous):
    config_file, _, expected, losses = setup
    run_dir = tmp_path / "run"
    SMSKDTrainer(load_config(config_file), run_dir, log=lambda _: None).run(max_epochs=after_epochs)
    path = run_dir / target
    before = path.read_bytes() if path.exists() else None
    assert (before is not None) == previous
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return DiskFullAfter(handle, budget) if str(file) == str(path) + ".tmp" else handle

    monkeypatch.setattr(atomic_io, "open", full_disk_open, raising=False)  # where the .tmp file is opened
    assert main(["train", "--resume", str(run_dir)]) == 1
    message = capsys.readouterr().err.strip()
    kept = f"the previous {path.name} is kept intact" if previous else f"no earlier {path.name} existed"
    assert message.startswith(f"error: could not write {path} (No space left on device); {kept}"), message
    assert f"continue with `smskd-fast train --resume {run_dir}`" in message
    assert "Traceback" not in message and len(message.splitlines()) == 1
    assert (path.read_bytes() if path.exists() else None) == before
    assert not path.with_name(path.name + ".tmp").exists()
    _check_readable(run_dir)
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir)]) == 0
    _check_final(run_dir, expected, losses)


def test_save_atomic_reraises_errors_that_are_not_about_the_disk(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle this")

    with pytest.raises(TypeError, match="cannot pickle"):
        checkpoint.save_atomic({"x": Unpicklable()}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.pt.tmp").exists()
