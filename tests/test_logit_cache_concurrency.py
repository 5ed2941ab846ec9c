"""Builders of one logit cache at once (two runs sharing a teacher cache): both finish, the cache is whole.

The oracle is `shard_logits`, the deterministic stand-in for the teacher, and a build by one process alone.
"""
from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from smskd_fast.training.logit_cache import CacheSpec, LogitCache, build

# Shards of 1 MiB, so that two builders' writes of one shard overlap often.
SPEC = CacheSpec(model_hash="m", data_fingerprint="d", augmentation_seed=None, epochs=(0,), num_samples=4096,
                 num_classes=256, dtype="float32", shard_rows=1024, epoch_invariant=True)
ROUNDS = 6


def shard_logits(epoch: int, first: int, count: int):
    """Deterministic logits and targets of samples [first, first + count): what a frozen teacher computes."""
    generator = torch.Generator().manual_seed(1000 * epoch + first)
    return torch.randn(count, SPEC.num_classes, generator=generator), torch.zeros(count, dtype=torch.long)


def _race_builder(folders, barrier, results) -> None:
    """One of two processes: per folder, waits for the other, then both build the cache there at once;
    reports (folder, shards written) or (folder, the error)."""
    for folder in folders:
        barrier.wait(timeout=60)
        try:
            written = build(LogitCache.create_or_resume(folder, SPEC), shard_logits)
            LogitCache.open(folder, SPEC)
            results.put((folder, written))
        except Exception as error:  # reported to the test, which names it
            results.put((folder, f"{type(error).__name__}: {error}"))


def _files(folder: Path):
    return {file.name: file.read_bytes() for file in sorted(folder.iterdir())}


def assert_holds_teacher_logits(folder: Path) -> None:
    """The cache opens, its checksums verify, and it holds exactly the teacher's logits."""
    reader = LogitCache.open(folder, SPEC)
    want = torch.cat([shard_logits(0, first, SPEC.shard_rows)[0] for _, first in SPEC.shards()])
    assert torch.equal(reader.read(0, range(SPEC.num_samples)), want)


def assert_whole_cache(folder: Path, single: Path) -> None:
    """assert_holds_teacher_logits, and the folder has exactly the files of a one-process build."""
    assert_holds_teacher_logits(folder)
    assert _files(folder) == _files(single), f"{folder} differs from a one-process build (leftover files?)"


def test_two_processes_building_one_cache_at_once_both_succeed_and_compute_each_shard_once(tmp_path):
    single = tmp_path / "single"
    build(LogitCache.create_or_resume(single, SPEC), shard_logits)
    folders = [str(tmp_path / f"round{index}") for index in range(ROUNDS)]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    builders = [context.Process(target=_race_builder, args=(folders, barrier, results)) for _ in range(2)]
    for builder in builders:
        builder.start()
    outcomes = [results.get(timeout=120) for _ in range(2 * ROUNDS)]
    for builder in builders:
        builder.join(timeout=60)
        assert builder.exitcode == 0
    failures = [outcome for outcome in outcomes if isinstance(outcome[1], str)]
    assert not failures, f"{len(failures)} of {2 * ROUNDS} concurrent builds failed, first: {failures[0]}"
    for folder in folders:
        written = [count for where, count in outcomes if where == folder]
        assert sum(written) == len(list(SPEC.shards())), f"each shard computed once, got {written} in {folder}"
        assert_whole_cache(Path(folder), single)


STALLED_BUILDER = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_logit_cache_concurrency import SPEC, shard_logits
from smskd_fast.training.logit_cache import LogitCache, build

def stalled(epoch, first, count):  # dies (SIGKILL) holding shard 0, its temporary file half-written
    if first == 0:
        Path({temporary!r}).write_bytes(b"half a shard")
        Path({started!r}).touch()
        time.sleep(120)
    return shard_logits(epoch, first, count)

build(LogitCache.create_or_resume({path!r}, SPEC), stalled)
"""


def test_a_builder_waits_for_a_shard_in_progress_and_writes_it_when_its_builder_is_killed(tmp_path):
    single, path, started = tmp_path / "single", tmp_path / "cache", tmp_path / "started"
    build(LogitCache.create_or_resume(single, SPEC), shard_logits)
    temporary = path / "shard-e00000-s000000000.npy.tmp"
    script = STALLED_BUILDER.format(tests=str(Path(__file__).parent), path=str(path), temporary=str(temporary),
                                    started=str(started))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    stalled = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert stalled.poll() is None and time.monotonic() < deadline, "the stalled builder did not start"
            time.sleep(0.01)
        cache = LogitCache.create_or_resume(path, SPEC)
        assert temporary.read_bytes() == b"half a shard", "a live builder's temporary file was removed"
        written = []
        builder = threading.Thread(target=lambda: written.append(build(cache, shard_logits)))
        builder.start()
        while cache.missing_shards() != [(0, 0)]:
            assert builder.is_alive(), "the build ended without the other shards"
            time.sleep(0.01)
        builder.join(timeout=1)
        assert builder.is_alive(), "the build did not wait for the shard another builder is writing"
    finally:
        stalled.send_signal(signal.SIGKILL)
        stalled.wait()
    builder.join(timeout=60)
    assert written == [len(list(SPEC.shards()))]
    assert_whole_cache(path, single)


def test_without_flock_a_finished_cache_still_opens_and_a_new_one_is_refused_naming_flock(tmp_path, monkeypatch):
    """A file system without flock (or a read-only one): a finished cache needs no lock, a build does."""
    build(LogitCache.create_or_resume(tmp_path / "finished", SPEC), shard_logits)

    def no_flock(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    assert build(LogitCache.create_or_resume(tmp_path / "finished", SPEC), shard_logits) == 0
    assert_holds_teacher_logits(tmp_path / "finished")
    with pytest.raises(OSError, match=r"cannot lock .*header\.lock to build the logit cache \(No locks available\); "
                                      r"the cache directory must be on a file system that supports flock"):
        LogitCache.create_or_resume(tmp_path / "new", SPEC)
