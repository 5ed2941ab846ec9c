"""On-disk store of a frozen model's logits per (epoch, sample), memory-mapped and checked.

A cache directory holds header.json (what the logits were computed from and how
they are stored) and shards: .npy files of one structured array each, for a
block of samples of one epoch, memory-mapped when read. Each shard is written
to a temporary name, flushed to disk, given a sidecar SHA-256, then renamed, so
a killed build leaves either a whole shard or none, and building resumes with
the shards that are missing. A reader refuses a cache whose header does not
match its run (naming the field) and a shard whose checksum is wrong.

Builders may run at once (two runs sharing a teacher cache, DDP ranks): each file
is written under an exclusive lock (flock) on its own lock file, so one writer
makes a shard while the others write other shards or wait for it, and a builder
deletes only the temporary files of a killed writer (whose lock the kernel released).

Two formats: "dense" keeps every logit (fp16 or fp32); "topk" keeps the k
largest logits and their class indices plus, per row, the true-class logit and
the row's log-sum-exp at temperature 1 and at each temperature of the run, so
that TCP and the kept classes' probabilities stay exact. A sample is one row of
logits (classification) or, for sequence data, sequence_length rows, one per token.

Epochs: a cache made for more epochs than a run needs serves that run (it reads only
its epochs); one that lacks an epoch is refused, naming the missing epochs. When a
sample's view does not depend on the epoch (no augmentation), the cache holds one
epoch (epoch_invariant) whose rows serve every epoch of any run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from smskd_fast.training.atomic_io import write_atomic, write_bytes_atomic

FORMAT_VERSION = 1
HEADER_NAME = "header.json"
FORMATS = ("dense", "topk")
STORED_DTYPES = ("float16", "float32")


class CacheMismatchError(ValueError):
    """The cache on disk was built for another model, data set, seed or layout."""


class CacheCorruptedError(RuntimeError):
    """A shard is truncated or its bytes do not match their checksum."""


@dataclass(frozen=True)
class CacheSpec:
    """Everything a cache must agree on with the run that reads it."""

    model_hash: str
    data_fingerprint: str
    augmentation_seed: Optional[int]  # None: no augmentation, the views depend on no seed
    epochs: Tuple[int, ...]           # the epochs stored; a run may read any subset of them
    num_samples: int
    num_classes: int
    format: str = "dense"
    dtype: str = "float16"
    topk: int = 0
    temperatures: Tuple[float, ...] = ()
    shard_rows: int = 4096
    format_version: int = FORMAT_VERSION
    sequence_length: int = 0       # tokens per sample (sequence data); 0: one row of logits per sample
    epoch_invariant: bool = False  # the views are the same in every epoch: epoch 0's rows serve every epoch

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"cache format must be one of {FORMATS}, got {self.format!r}")
        if self.dtype not in STORED_DTYPES:
            raise ValueError(f"cache dtype must be one of {STORED_DTYPES}, got {self.dtype!r}")
        if self.format == "topk" and not 0 < self.topk <= self.num_classes:
            raise ValueError(f"cache topk must be in [1, num_classes={self.num_classes}], got {self.topk}")
        if self.num_samples < 1 or self.num_classes < 1 or self.shard_rows < 1:
            raise ValueError("cache num_samples, num_classes and shard_rows must be >= 1")
        if not self.epochs:
            raise ValueError("cache epochs must name at least one epoch")
        if self.sequence_length < 0:
            raise ValueError(f"cache sequence_length must be >= 0, got {self.sequence_length}")
        if self.epoch_invariant and (self.epochs != (0,) or self.augmentation_seed is not None):
            raise ValueError("an epoch_invariant cache holds epoch 0 only (epochs=(0,)) and no augmentation_seed, "
                             f"got epochs={self.epochs}, augmentation_seed={self.augmentation_seed}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CacheSpec":
        data = dict(data)
        data["epochs"] = tuple(data["epochs"])
        data["temperatures"] = tuple(data["temperatures"])
        return cls(**data)

    @property
    def positions(self) -> Tuple[int, ...]:
        """The leading shape of one sample's logits: () for classification, (L,) for sequence data."""
        return (self.sequence_length,) if self.sequence_length else ()

    def row_dtype(self) -> np.dtype:
        """The structured dtype of one stored sample (one record per sample, its tokens inside)."""
        at = self.positions
        if self.format == "dense":
            return np.dtype([("logits", self.dtype, at + (self.num_classes,))])
        return np.dtype([
            ("values", self.dtype, at + (self.topk,)),
            ("indices", np.int32, at + (self.topk,)),
            ("true_logit", np.float32, at),
            ("log_sum_exp", np.float32, at + (1 + len(self.temperatures),)),  # at T = 1, then each temperature
        ])

    def stored_epoch(self, epoch: int) -> int:
        """The stored epoch whose rows serve `epoch`: itself, or 0 when the views do not depend on it."""
        return 0 if self.epoch_invariant else epoch

    def shards(self) -> Iterator[Tuple[int, int]]:
        """(epoch, first sample) of every shard."""
        for epoch in self.epochs:
            for first in range(0, self.num_samples, self.shard_rows):
                yield epoch, first


@dataclass
class TopKLogits:
    """Rows of a top-k cache: kept logits, their classes, the true-class logit and log-sum-exps."""

    values: torch.Tensor       # (B, [L,] k)
    indices: torch.Tensor      # (B, [L,] k) int64
    true_logit: torch.Tensor   # (B, [L])
    log_sum_exp: torch.Tensor  # (B, [L,] 1 + len(temperatures)): at T = 1, then each run temperature


def model_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(arrays: Iterable[np.ndarray]) -> str:
    """SHA-256 of a data set's arrays (e.g. images and labels)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}:{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _acquire(lock: Path, wait: bool) -> Optional[int]:
    """A descriptor of the file `lock` (made if missing) that holds its exclusive flock; None at once if
    another process holds it and not `wait`."""
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            if os.path.samestat(os.fstat(descriptor), os.stat(lock)):
                return descriptor
        except BlockingIOError:
            os.close(descriptor)
            return None
        except FileNotFoundError:
            pass
        except OSError as error:  # a file system without flock (e.g. Lustre mounted without it)
            os.close(descriptor)
            raise OSError(error.errno, f"cannot lock {lock} to build the logit cache ({error.strerror}); the "
                          "cache directory must be on a file system that supports flock") from error
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)  # its previous holder deleted the file we locked: lock the one now at the path


@contextlib.contextmanager
def _exclusive(lock: Path, *, wait: bool = True) -> Iterator[bool]:
    """Holds an exclusive flock on the file `lock` and yields True, or yields False (see _acquire). The
    holder deletes the file on release, so a finished cache keeps no lock files; a killed holder's lock
    is released by the kernel and its file taken over."""
    descriptor = _acquire(lock, wait)
    if descriptor is None:
        yield False
        return
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)
        os.close(descriptor)


def _lock_path(file: Path) -> Path:
    """The lock of a cache file and its temporary files: header.lock, shard-e…-s….lock (the .npy and .sha256)."""
    return file.with_name(file.name.split(".")[0] + ".lock")


class LogitCache:
    """A cache directory for one CacheSpec: build it shard by shard, then read rows."""

    def __init__(self, path: Path, spec: CacheSpec) -> None:
        self.path = Path(path)
        self.spec = spec
        self._row_dtype = spec.row_dtype()
        self._verified: Dict[Tuple[int, int], np.ndarray] = {}

    # -- opening ------------------------------------------------------------------

    @classmethod
    def create_or_resume(cls, path: Path, spec: CacheSpec) -> "LogitCache":
        """Opens a cache for building: new, or one begun earlier for the same spec (also by a builder
        still running); removes what killed builders left."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        header = path / HEADER_NAME
        if not header.exists():  # a finished cache is opened without writing (it may be read-only)
            with _exclusive(_lock_path(header)):  # builders starting at once write the header once
                if not header.exists():
                    write_bytes_atomic(header, json.dumps({"spec": spec.to_json()}, indent=1).encode())
        cls._check_spec(path, spec)
        cls._remove_leftovers(path)
        return cls(path, spec)

    @staticmethod
    def _remove_leftovers(path: Path) -> None:
        """Deletes the temporary files (a shard or header not finished) and lock files of killed writers:
        those of files whose lock no live writer holds."""
        for stem in sorted({file.name.split(".")[0] for file in (*path.glob("*.tmp"), *path.glob("*.lock"))}):
            with _exclusive(path / f"{stem}.lock", wait=False) as held:
                if held:
                    for leftover in path.glob(f"{stem}.*.tmp"):
                        leftover.unlink(missing_ok=True)

    @classmethod
    def attach(cls, path: Path, spec: CacheSpec) -> "LogitCache":
        """Joins a build that create_or_resume began (in another process): checks the header only."""
        cls._check_spec(Path(path), spec)
        return cls(Path(path), spec)

    @classmethod
    def open(cls, path: Path, spec: CacheSpec) -> "LogitCache":
        """Opens a complete cache for reading; refuses one that does not match spec or is unfinished."""
        cls._check_spec(Path(path), spec)
        cache = cls(Path(path), spec)
        missing = cache.missing_shards()
        if missing:
            raise CacheCorruptedError(
                f"logit cache {path} is incomplete: {len(missing)} of {sum(1 for _ in spec.shards())} shards are "
                f"missing (first: epoch {missing[0][0]}, samples from {missing[0][1]}); run "
                "`smskd-fast cache build` again to finish it")
        return cache

    @staticmethod
    def _check_spec(path: Path, spec: CacheSpec) -> None:
        """Refuses a cache whose header differs from spec in any field, except that its epochs
        may be a superset of the run's (a longer run's cache serves a shorter one)."""
        header = path / HEADER_NAME
        if not header.exists():
            raise CacheMismatchError(f"{path} is not a logit cache: it has no {HEADER_NAME}")
        try:
            stored = json.loads(header.read_text())["spec"]
        except (ValueError, KeyError) as error:
            raise CacheCorruptedError(f"{header} is unreadable ({error}); delete {path} to rebuild it") from error
        wanted = spec.to_json()
        defaults = {f.name: f.default for f in dataclasses.fields(CacheSpec)}
        first = ("format_version", "epoch_invariant")  # the fields that explain the others' differences
        for field in first + tuple(name for name in wanted if name not in first):
            have = stored.get(field, defaults[field])  # a header older than the field has its default
            if isinstance(wanted[field], tuple):
                have = tuple(have) if have is not None else None
            if field == "epochs" and have is not None:
                missing = sorted(set(wanted[field]) - set(have))
                if missing:
                    raise CacheMismatchError(
                        f"logit cache {path} was built with epochs={list(have)!r} but this run needs "
                        f"{list(wanted[field])!r}: it lacks epochs {missing}; build the cache for the longest run "
                        "that shares it, or point this run at another cache directory")
                continue
            if have != wanted[field]:
                raise CacheMismatchError(
                    f"logit cache {path} was built with {field}={have!r} but this run needs {wanted[field]!r}; "
                    f"point the run at another cache directory or rebuild this one")

    # -- building -----------------------------------------------------------------

    def _shard_path(self, epoch: int, first: int) -> Path:
        return self.path / f"shard-e{epoch:05d}-s{first:09d}.npy"

    def _shard_rows(self, first: int) -> int:
        return min(self.spec.shard_rows, self.spec.num_samples - first)

    def missing_shards(self) -> List[Tuple[int, int]]:
        """Shards not yet written (a shard without its checksum counts as missing)."""
        return [(e, f) for e, f in self.spec.shards() if self._is_missing(e, f)]

    def _checksum_path(self, epoch: int, first: int) -> Path:
        return self._shard_path(epoch, first).with_suffix(".sha256")

    def _sample_shape(self) -> Tuple[int, ...]:
        return self.spec.positions + (self.spec.num_classes,)

    def encode(self, logits: torch.Tensor, target: Optional[torch.Tensor]) -> np.ndarray:
        """Samples' logits (B, [L,] C) as stored records; top-k needs the target (B, [L]) for the
        true-class logit."""
        logits = logits.detach().float().cpu()
        records = np.zeros(logits.shape[0], dtype=self._row_dtype)
        if self.spec.format == "dense":
            records["logits"] = logits.numpy().astype(self.spec.dtype)
            return records
        if target is None:
            raise ValueError("a top-k logit cache needs the target to store each row's true-class logit")
        values, indices = logits.topk(self.spec.topk, dim=-1)
        records["values"] = values.numpy().astype(self.spec.dtype)
        records["indices"] = indices.numpy().astype(np.int32)
        records["true_logit"] = logits.gather(-1, target.long().cpu().unsqueeze(-1)).squeeze(-1).numpy()
        lse = [torch.logsumexp(logits, -1)] + [torch.logsumexp(logits / T, -1) for T in self.spec.temperatures]
        records["log_sum_exp"] = torch.stack(lse, -1).numpy()
        return records

    def _is_missing(self, epoch: int, first: int) -> bool:
        return not (self._shard_path(epoch, first).exists() and self._checksum_path(epoch, first).exists())

    def _shard_lock(self, epoch: int, first: int, *, wait: bool = True):
        """The shard's exclusive lock (see _exclusive): held while it is computed and written."""
        return _exclusive(_lock_path(self._shard_path(epoch, first)), wait=wait)

    def write_shard(self, epoch: int, first: int, logits: torch.Tensor, target: Optional[torch.Tensor] = None) -> None:
        """Writes the shard of samples [first, first + shard_rows) of epoch, atomically, under its lock."""
        with self._shard_lock(epoch, first):
            self._write_shard(epoch, first, logits, target)

    def _write_shard(self, epoch: int, first: int, logits: torch.Tensor, target: Optional[torch.Tensor]) -> None:
        """write_shard for a caller that holds the shard's lock."""
        if (epoch, first) not in set(self.spec.shards()):
            raise ValueError(f"no shard starts at sample {first} of epoch {epoch} in this cache")
        shape = (self._shard_rows(first),) + self._sample_shape()
        if tuple(logits.shape) != shape:
            raise ValueError(f"shard logits must have shape {shape}, got {tuple(logits.shape)}")
        records = self.encode(logits, target)
        checksum = self._checksum_path(epoch, first)

        def write_records(handle) -> None:  # the checksum of the written file lands before the shard does
            np.save(handle, records, allow_pickle=False)
            handle.flush()
            write_bytes_atomic(checksum, _sha256_file(Path(handle.name)).encode())

        write_atomic(self._shard_path(epoch, first), write_records)

    # -- reading ------------------------------------------------------------------

    def _records(self, epoch: int, first: int) -> np.ndarray:
        key = (epoch, first)
        if key not in self._verified:
            path, checksum = self._shard_path(epoch, first), self._checksum_path(epoch, first)
            if not path.exists() or not checksum.exists():
                raise CacheCorruptedError(f"logit cache shard {path} is missing")
            if _sha256_file(path) != checksum.read_text().strip():
                raise CacheCorruptedError(
                    f"logit cache shard {path} does not match its checksum (truncated or overwritten); "
                    f"delete it and run `smskd-fast cache build` again to rebuild it")
            try:
                records = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as error:
                raise CacheCorruptedError(f"logit cache shard {path} is unreadable: {error}") from error
            if records.dtype != self._row_dtype or records.shape != (self._shard_rows(first),):
                raise CacheCorruptedError(f"logit cache shard {path} has layout {records.dtype}{records.shape}, "
                                          f"expected {self._row_dtype}({self._shard_rows(first)},)")
            self._verified[key] = records
        return self._verified[key]

    def read(self, epoch: int, samples: Sequence[int], *, keep_stored_dtype: bool = False):
        """Rows for the given sample indices of epoch: a (B, [L,] C) tensor, or TopKLogits.

        Dense logits come as float32, or in the stored dtype with keep_stored_dtype (half the
        memory for an fp16 cache, for a caller that converts them a chunk at a time). An
        epoch_invariant cache serves every epoch from its one stored epoch.
        """
        if not self.spec.epoch_invariant and epoch not in self.spec.epochs:
            raise KeyError(f"epoch {epoch} is not in this cache (it holds epochs {list(self.spec.epochs)})")
        epoch = self.spec.stored_epoch(epoch)
        samples = np.asarray(samples, dtype=np.int64)
        if samples.size and (samples.min() < 0 or samples.max() >= self.spec.num_samples):
            raise IndexError(f"sample indices must be in [0, {self.spec.num_samples}), got {samples.min()}.."
                             f"{samples.max()}")
        rows = np.empty(samples.shape[0], dtype=self._row_dtype)
        firsts = (samples // self.spec.shard_rows) * self.spec.shard_rows
        for first in np.unique(firsts):
            where = firsts == first
            rows[where] = self._records(epoch, int(first))[samples[where] - first]
        if self.spec.format == "dense":
            logits = rows["logits"] if keep_stored_dtype else rows["logits"].astype(np.float32)
            return torch.from_numpy(np.ascontiguousarray(logits))
        return TopKLogits(
            values=torch.from_numpy(rows["values"].astype(np.float32)),
            indices=torch.from_numpy(rows["indices"].astype(np.int64)),
            true_logit=torch.from_numpy(rows["true_logit"].copy()),
            log_sum_exp=torch.from_numpy(rows["log_sum_exp"].copy()),
        )


def build(cache: LogitCache, compute_shard, *, rank: int = 0, world_size: int = 1) -> int:
    """Writes every missing shard; compute_shard(epoch, first, count) -> (logits (count, C), target).

    With world_size > 1, the caller of rank r writes the missing shards whose index
    in spec.shards() is r modulo world_size, so that ranks build one cache in
    parallel without touching each other's files. Returns the number of shards this
    caller wrote. Safe to call again after a kill: shards already on disk are kept,
    a half-written one never counts. Safe beside other builders of the cache: a shard
    another one is writing is skipped first, then waited for, and written here only if
    that builder died before finishing it.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    mine = {shard for index, shard in enumerate(cache.spec.shards()) if index % world_size == rank}
    pending = [shard for shard in cache.missing_shards() if shard in mine]
    written = 0
    for wait in (False, True):
        busy = []
        for epoch, first in pending:
            with cache._shard_lock(epoch, first, wait=wait) as held:
                if not held:
                    busy.append((epoch, first))
                elif cache._is_missing(epoch, first):
                    logits, target = compute_shard(epoch, first, cache._shard_rows(first))
                    cache._write_shard(epoch, first, logits, target)
                    written += 1
        pending = busy
    return written
