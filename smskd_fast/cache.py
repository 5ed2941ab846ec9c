"""On-disk store of a frozen model's logits per (epoch, sample), memory-mapped and checked.

A cache directory holds header.json (what the logits were computed from and how
they are stored) and shards: .npy files of one structured array each, for a
block of samples of one epoch, memory-mapped when read. Each shard is written
to a temporary name, flushed to disk, given a sidecar SHA-256, then renamed, so
a killed build leaves either a whole shard or none, and building resumes with
the shards that are missing. A reader refuses a cache whose header does not
match its run (naming the field) and a shard whose checksum is wrong.

Two formats: "dense" keeps every logit (fp16 or fp32); "topk" keeps the k
largest logits and their class indices plus, per row, the true-class logit and
the row's log-sum-exp at temperature 1 and at each temperature of the run, so
that TCP and the kept classes' probabilities stay exact.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

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
    augmentation_seed: int
    epochs: Tuple[int, ...]
    num_samples: int
    num_classes: int
    format: str = "dense"
    dtype: str = "float16"
    topk: int = 0
    temperatures: Tuple[float, ...] = ()
    shard_rows: int = 4096
    format_version: int = FORMAT_VERSION

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

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CacheSpec":
        data = dict(data)
        data["epochs"] = tuple(data["epochs"])
        data["temperatures"] = tuple(data["temperatures"])
        return cls(**data)

    def row_dtype(self) -> np.dtype:
        """The structured dtype of one stored row."""
        if self.format == "dense":
            return np.dtype([("logits", self.dtype, (self.num_classes,))])
        return np.dtype([
            ("values", self.dtype, (self.topk,)),
            ("indices", np.int32, (self.topk,)),
            ("true_logit", np.float32),
            ("log_sum_exp", np.float32, (1 + len(self.temperatures),)),  # at T = 1, then each temperature
        ])

    def shards(self) -> Iterator[Tuple[int, int]]:
        """(epoch, first sample) of every shard."""
        for epoch in self.epochs:
            for first in range(0, self.num_samples, self.shard_rows):
                yield epoch, first


@dataclass
class TopKLogits:
    """Rows of a top-k cache: kept logits, their classes, the true-class logit and log-sum-exps."""

    values: torch.Tensor       # (B, k)
    indices: torch.Tensor      # (B, k) int64
    true_logit: torch.Tensor   # (B,)
    log_sum_exp: torch.Tensor  # (B, 1 + len(temperatures)): at T = 1, then each run temperature


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


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
        """Opens a cache for building: new, or one begun earlier for the same spec."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        header = path / HEADER_NAME
        if header.exists():
            cls._check_spec(path, spec)
        else:
            _write_atomically(header, json.dumps({"spec": spec.to_json()}, indent=1).encode())
        cache = cls(path, spec)
        for leftover in path.glob("*.tmp"):
            leftover.unlink()  # a shard or header a killed build did not finish
        return cache

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
        header = path / HEADER_NAME
        if not header.exists():
            raise CacheMismatchError(f"{path} is not a logit cache: it has no {HEADER_NAME}")
        try:
            stored = json.loads(header.read_text())["spec"]
        except (ValueError, KeyError) as error:
            raise CacheCorruptedError(f"{header} is unreadable ({error}); delete {path} to rebuild it") from error
        wanted = spec.to_json()
        for field in wanted:
            have = stored.get(field)
            if isinstance(wanted[field], tuple):
                have = tuple(have) if have is not None else None
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
        return [(e, f) for e, f in self.spec.shards()
                if not (self._shard_path(e, f).exists() and self._checksum_path(e, f).exists())]

    def _checksum_path(self, epoch: int, first: int) -> Path:
        return self._shard_path(epoch, first).with_suffix(".sha256")

    def encode(self, logits: torch.Tensor, target: Optional[torch.Tensor]) -> np.ndarray:
        """Rows of logits (B, C) as stored records; top-k needs the target for the true-class logit."""
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
        records["true_logit"] = logits.gather(1, target.long().cpu()[:, None]).squeeze(1).numpy()
        lse = [torch.logsumexp(logits, -1)] + [torch.logsumexp(logits / T, -1) for T in self.spec.temperatures]
        records["log_sum_exp"] = torch.stack(lse, -1).numpy()
        return records

    def write_shard(self, epoch: int, first: int, logits: torch.Tensor, target: Optional[torch.Tensor] = None) -> None:
        """Writes the shard of samples [first, first + shard_rows) of epoch, atomically."""
        if (epoch, first) not in set(self.spec.shards()):
            raise ValueError(f"no shard starts at sample {first} of epoch {epoch} in this cache")
        if logits.shape != (self._shard_rows(first), self.spec.num_classes):
            raise ValueError(f"shard logits must have shape {(self._shard_rows(first), self.spec.num_classes)}, "
                             f"got {tuple(logits.shape)}")
        records = self.encode(logits, target)
        path = self._shard_path(epoch, first)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, records, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        _write_atomically(self._checksum_path(epoch, first), _sha256_file(tmp).encode())
        os.replace(tmp, path)

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

    def read(self, epoch: int, samples: Sequence[int]):
        """Rows for the given sample indices of epoch: a float32 (B, C) tensor, or TopKLogits."""
        if epoch not in self.spec.epochs:
            raise KeyError(f"epoch {epoch} is not in this cache (it holds epochs {list(self.spec.epochs)})")
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
            return torch.from_numpy(rows["logits"].astype(np.float32))
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
    a half-written one never counts.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    mine = {shard for index, shard in enumerate(cache.spec.shards()) if index % world_size == rank}
    written = 0
    for epoch, first in cache.missing_shards():
        if (epoch, first) not in mine:
            continue
        logits, target = compute_shard(epoch, first, cache._shard_rows(first))
        cache.write_shard(epoch, first, logits, target)
        written += 1
    return written
