"""The logit cache: exact round trips, refusal of mismatched or corrupted caches, resumable builds."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smskd_fast.training.logit_cache import (CacheCorruptedError, CacheMismatchError, CacheSpec, LogitCache, build,
                              data_fingerprint, model_hash)

NUM_SAMPLES, NUM_CLASSES = 10, 7


def spec(**changes) -> CacheSpec:
    base = CacheSpec(model_hash="m" * 8, data_fingerprint="d" * 8, augmentation_seed=3, epochs=(0, 1),
                     num_samples=NUM_SAMPLES, num_classes=NUM_CLASSES, shard_rows=4)
    return dataclasses.replace(base, **changes)


def teacher_logits(epoch: int, first: int, count: int):
    """Deterministic logits and targets standing in for a frozen teacher's outputs."""
    g = torch.Generator().manual_seed(1000 * epoch + first)
    return torch.randn(count, NUM_CLASSES, generator=g) * 4, torch.randint(0, NUM_CLASSES, (count,), generator=g)


def all_rows(epoch: int):
    chunks = [teacher_logits(epoch, first, min(4, NUM_SAMPLES - first)) for first in range(0, NUM_SAMPLES, 4)]
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_dense_round_trip(tmp_path, dtype):
    cache = LogitCache.create_or_resume(tmp_path, spec(dtype=dtype))
    assert build(cache, teacher_logits) == 6
    reader = LogitCache.open(tmp_path, spec(dtype=dtype))
    samples = [9, 0, 4, 3, 8]
    for epoch in (0, 1):
        logits, _ = all_rows(epoch)
        want = logits[samples].to(getattr(torch, dtype)).float()
        assert torch.equal(reader.read(epoch, samples), want)


def test_topk_round_trip_keeps_tcp_and_probabilities_exact(tmp_path):
    s = spec(format="topk", topk=3, dtype="float32", temperatures=(4.0, 2.0))
    build(LogitCache.create_or_resume(tmp_path, s), teacher_logits)
    rows = LogitCache.open(tmp_path, s).read(1, range(NUM_SAMPLES))
    logits, target = all_rows(1)
    values, indices = logits.topk(3, dim=-1)
    assert torch.equal(rows.values, values) and torch.equal(rows.indices, indices)
    assert torch.equal(rows.true_logit, logits.gather(1, target[:, None]).squeeze(1))
    tcp = torch.exp(rows.true_logit - rows.log_sum_exp[:, 0])
    torch.testing.assert_close(tcp, torch.softmax(logits, -1).gather(1, target[:, None]).squeeze(1))
    kept_at_T4 = torch.exp(rows.values / 4.0 - rows.log_sum_exp[:, 1:2])
    torch.testing.assert_close(kept_at_T4, torch.softmax(logits / 4.0, -1).gather(1, indices))


@pytest.mark.parametrize("field, value", [("model_hash", "other"), ("data_fingerprint", "other"),
                                          ("augmentation_seed", 4), ("epochs", (0, 1, 2)), ("dtype", "float32"),
                                          ("num_classes", 8), ("shard_rows", 5)])
def test_mismatched_cache_is_refused_naming_the_field(tmp_path, field, value):
    build(LogitCache.create_or_resume(tmp_path, spec()), teacher_logits)
    with pytest.raises(CacheMismatchError, match=rf"built with {field}=.* but this run needs"):
        LogitCache.open(tmp_path, spec(**{field: value}))
    with pytest.raises(CacheMismatchError, match=field):
        LogitCache.create_or_resume(tmp_path, spec(**{field: value}))


def test_incomplete_cache_is_refused_until_resumed(tmp_path):
    cache = LogitCache.create_or_resume(tmp_path, spec())
    cache.write_shard(0, 0, *teacher_logits(0, 0, 4))
    with pytest.raises(CacheCorruptedError, match="incomplete: 5 of 6 shards are missing"):
        LogitCache.open(tmp_path, spec())
    assert build(LogitCache.create_or_resume(tmp_path, spec()), teacher_logits) == 5
    LogitCache.open(tmp_path, spec())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_checksum"])
def test_corrupted_shard_is_detected_never_read(tmp_path, damage):
    build(LogitCache.create_or_resume(tmp_path, spec()), teacher_logits)
    shard = sorted(tmp_path.glob("shard-e00001-s000000004.npy"))[0]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x01
        shard.write_bytes(bytes(data))
    else:
        shard.with_suffix(".sha256").unlink()
    if damage == "delete_checksum":
        with pytest.raises(CacheCorruptedError, match="incomplete"):
            LogitCache.open(tmp_path, spec())
    else:
        reader = LogitCache.open(tmp_path, spec())
        reader.read(1, [0, 1])  # other shards still read
        with pytest.raises(CacheCorruptedError, match="does not match its checksum"):
            reader.read(1, [5])
        shard.unlink()  # the way out the message names: delete and rebuild
        assert build(LogitCache.create_or_resume(tmp_path, spec()), teacher_logits) == 1
        assert torch.equal(LogitCache.open(tmp_path, spec()).read(1, [5]), all_rows(1)[0][[5]].half().float())


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cache format must be one of"):
        spec(format="sparse")
    with pytest.raises(ValueError, match=r"cache topk must be in \[1, num_classes=7\], got 9"):
        spec(format="topk", topk=9)
    cache = LogitCache.create_or_resume(tmp_path, spec())
    with pytest.raises(ValueError, match=r"shard logits must have shape \(4, 7\)"):
        cache.write_shard(0, 0, torch.zeros(3, 7))
    with pytest.raises(ValueError, match="no shard starts at sample 2"):
        cache.write_shard(0, 2, torch.zeros(4, 7))
    build(cache, teacher_logits)
    reader = LogitCache.open(tmp_path, spec())
    with pytest.raises(KeyError, match="epoch 5 is not in this cache"):
        reader.read(5, [0])
    with pytest.raises(IndexError, match=r"sample indices must be in \[0, 10\)"):
        reader.read(0, [10])
    with pytest.raises(CacheMismatchError, match="is not a logit cache"):
        LogitCache.open(tmp_path / "nothing", spec())


def test_hashes_change_with_the_weights_and_the_data():
    model = torch.nn.Linear(3, 2)
    before = model_hash(model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-3
    assert model_hash(model) != before
    images = np.zeros((4, 2), dtype=np.float32)
    labels = np.arange(4)
    fingerprint = data_fingerprint([images, labels])
    images[1, 1] = 1
    assert data_fingerprint([images, labels]) != fingerprint


def test_model_hash_covers_scalar_buffers():
    """BatchNorm's num_batches_tracked is a 0-d buffer: hashed like any other tensor."""
    model = torch.nn.BatchNorm1d(3)
    before = model_hash(model)
    model.num_batches_tracked += 1
    assert model_hash(model) != before


BUILDER = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_cache import spec, teacher_logits
from smskd_fast.training.logit_cache import LogitCache, build

def slow(epoch, first, count):
    time.sleep(0.05)
    return teacher_logits(epoch, first, count)

build(LogitCache.create_or_resume({path!r}, spec(shard_rows=1)), slow)
"""


def test_kill_9_during_build_then_resume_gives_the_uninterrupted_cache(tmp_path):
    """Builds shard by shard in a subprocess killed with SIGKILL at random moments, then resumes."""
    rng = np.random.default_rng(0)
    path = tmp_path / "cache"
    script = BUILDER.format(tests=str(Path(__file__).parent), path=str(path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    kills_mid_build = 0
    for _ in range(8):
        before = len(list(path.glob("shard-*.npy")))
        process = subprocess.Popen([sys.executable, "-c", script], env=env)
        while process.poll() is None and len(list(path.glob("shard-*.npy"))) <= before:
            time.sleep(0.01)  # wait until this run has written a shard of its own
        time.sleep(float(rng.uniform(0.0, 0.2)))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills_mid_build += 1
        process.wait()
        if not LogitCache.create_or_resume(path, spec(shard_rows=1)).missing_shards():
            break
    assert kills_mid_build >= 3, "too few kills landed mid-build for the test to mean anything"
    build(LogitCache.create_or_resume(path, spec(shard_rows=1)), teacher_logits)
    reader = LogitCache.open(path, spec(shard_rows=1))
    for epoch in (0, 1):
        want = torch.cat([teacher_logits(epoch, i, 1)[0] for i in range(NUM_SAMPLES)])
        assert torch.equal(reader.read(epoch, range(NUM_SAMPLES)), want.half().float())
    assert not list(path.glob("*.tmp"))


def test_ranks_build_disjoint_shares_of_one_cache(tmp_path):
    """As DDP ranks do: rank 0 creates the cache, each rank writes every world_size-th missing shard."""
    LogitCache.create_or_resume(tmp_path, spec())
    written = [build(LogitCache.attach(tmp_path, spec()), teacher_logits, rank=r, world_size=4) for r in range(4)]
    assert written == [2, 2, 1, 1]  # 6 shards dealt round-robin
    reader = LogitCache.open(tmp_path, spec())
    for epoch in (0, 1):
        assert torch.equal(reader.read(epoch, range(NUM_SAMPLES)), all_rows(epoch)[0].half().float())
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        build(reader, teacher_logits, rank=2, world_size=2)
    with pytest.raises(CacheMismatchError, match="built with augmentation_seed"):
        LogitCache.attach(tmp_path, spec(augmentation_seed=9))


SEQUENCE_LENGTH = 5


def sequence_logits(epoch: int, first: int, count: int):
    """Per-token logits (count, L, C) and next-token targets (count, L), as a language model gives."""
    g = torch.Generator().manual_seed(1000 * epoch + first + 7)
    return (torch.randn(count, SEQUENCE_LENGTH, NUM_CLASSES, generator=g) * 4,
            torch.randint(0, NUM_CLASSES, (count, SEQUENCE_LENGTH), generator=g))


def sequence_rows(epoch: int):
    chunks = [sequence_logits(epoch, first, min(4, NUM_SAMPLES - first)) for first in range(0, NUM_SAMPLES, 4)]
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_sequence_samples_store_one_row_per_token(tmp_path, dtype):
    s = spec(dtype=dtype, sequence_length=SEQUENCE_LENGTH)
    build(LogitCache.create_or_resume(tmp_path, s), sequence_logits)
    reader = LogitCache.open(tmp_path, s)
    samples = [9, 0, 4, 3, 8]
    for epoch in (0, 1):
        want = sequence_rows(epoch)[0][samples].to(getattr(torch, dtype))
        assert torch.equal(reader.read(epoch, samples), want.float())
        stored = reader.read(epoch, samples, keep_stored_dtype=True)
        assert stored.dtype == getattr(torch, dtype) and torch.equal(stored, want)
    assert s.row_dtype().itemsize == SEQUENCE_LENGTH * NUM_CLASSES * np.dtype(dtype).itemsize
    with pytest.raises(ValueError, match=r"shard logits must have shape \(4, 5, 7\)"):
        LogitCache.create_or_resume(tmp_path, s).write_shard(0, 0, torch.zeros(4, NUM_CLASSES))


def test_sequence_top_k_keeps_each_token_s_tcp_and_probabilities_exact(tmp_path):
    s = spec(format="topk", topk=3, dtype="float32", temperatures=(2.0,), sequence_length=SEQUENCE_LENGTH)
    build(LogitCache.create_or_resume(tmp_path, s), sequence_logits)
    rows = LogitCache.open(tmp_path, s).read(1, range(NUM_SAMPLES))
    logits, target = sequence_rows(1)
    values, indices = logits.topk(3, dim=-1)
    assert rows.values.shape == (NUM_SAMPLES, SEQUENCE_LENGTH, 3)
    assert torch.equal(rows.values, values) and torch.equal(rows.indices, indices)
    assert torch.equal(rows.true_logit, logits.gather(-1, target[..., None]).squeeze(-1))
    tcp = torch.exp(rows.true_logit - rows.log_sum_exp[..., 0])
    torch.testing.assert_close(tcp, torch.softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1))
    kept_at_T2 = torch.exp(rows.values / 2.0 - rows.log_sum_exp[..., 1:2])
    torch.testing.assert_close(kept_at_T2, torch.softmax(logits / 2.0, -1).gather(-1, indices))


def test_a_cache_of_more_epochs_serves_a_run_of_fewer(tmp_path):
    """A run reads a subset of a longer run's epochs: only those need to be built, and they are read."""
    longer = spec(epochs=(0, 1, 2))
    cache = LogitCache.create_or_resume(tmp_path, longer)
    for first in range(0, NUM_SAMPLES, 4):  # epochs 0 and 1 only, as a build killed in epoch 2 leaves it
        for epoch in (0, 1):
            cache.write_shard(epoch, first, *teacher_logits(epoch, first, min(4, NUM_SAMPLES - first)))
    with pytest.raises(CacheCorruptedError, match="incomplete: 3 of 9 shards are missing"):
        LogitCache.open(tmp_path, longer)
    shorter = LogitCache.open(tmp_path, spec())  # epochs (0, 1): complete for this run
    for epoch in (0, 1):
        assert torch.equal(shorter.read(epoch, range(NUM_SAMPLES)), all_rows(epoch)[0].half().float())
    with pytest.raises(KeyError, match="epoch 2 is not in this cache"):
        shorter.read(2, [0])  # the run's own epochs, not the header's
    assert build(LogitCache.create_or_resume(tmp_path, spec()), teacher_logits) == 0
    assert build(LogitCache.create_or_resume(tmp_path, longer), teacher_logits) == 3


def test_a_cache_that_lacks_epochs_is_refused_naming_them(tmp_path):
    build(LogitCache.create_or_resume(tmp_path, spec()), teacher_logits)
    for opener in (LogitCache.open, LogitCache.create_or_resume, LogitCache.attach):
        with pytest.raises(CacheMismatchError, match=r"built with epochs=\[0, 1\] but this run needs "
                                                     r"\[0, 1, 2, 3\]: it lacks epochs \[2, 3\]"):
            opener(tmp_path, spec(epochs=(0, 1, 2, 3)))
    with pytest.raises(CacheMismatchError, match="built with augmentation_seed=3"):  # other fields: equality
        LogitCache.open(tmp_path, spec(epochs=(0,), augmentation_seed=4))


def invariant(**changes) -> CacheSpec:
    return spec(epochs=(0,), augmentation_seed=None, epoch_invariant=True, **changes)


def test_an_epoch_invariant_cache_serves_every_epoch_from_one(tmp_path):
    build(LogitCache.create_or_resume(tmp_path, invariant()), teacher_logits)
    assert len(list(tmp_path.glob("shard-*.npy"))) == 3  # one epoch of 3 shards
    reader = LogitCache.open(tmp_path, invariant())
    for epoch in (0, 1, 7):
        assert torch.equal(reader.read(epoch, [2, 9]), all_rows(0)[0][[2, 9]].half().float())
    with pytest.raises(CacheMismatchError, match="built with epoch_invariant=True but this run needs False"):
        LogitCache.open(tmp_path, spec())
    with pytest.raises(ValueError, match="an epoch_invariant cache holds epoch 0 only"):
        spec(epoch_invariant=True)


def test_a_header_written_before_the_sequence_and_invariant_fields_still_opens(tmp_path):
    """Caches built by the first version lack sequence_length and epoch_invariant: they mean 0 and False."""
    build(LogitCache.create_or_resume(tmp_path, spec()), teacher_logits)
    header = tmp_path / "header.json"
    stored = json.loads(header.read_text())
    del stored["spec"]["sequence_length"], stored["spec"]["epoch_invariant"]
    header.write_text(json.dumps(stored))
    assert torch.equal(LogitCache.open(tmp_path, spec()).read(1, [3]), all_rows(1)[0][[3]].half().float())
    with pytest.raises(CacheMismatchError, match="built with sequence_length=0 but this run needs 5"):
        LogitCache.open(tmp_path, spec(sequence_length=SEQUENCE_LENGTH))
