"""The trainer's logit caches: the frozen teacher's and reference's logits read from disk.

A frozen model's logits for sample i under the view of epoch e never change, and
the view is a pure function of (seed, e, i) (data.augmentation_draws). So the
teacher's logits can be computed once, ahead of a run (`smskd-fast cache build`),
and the reference's once at the start of its stage, in inference mode and large
batches, and then read per batch instead of running the model. The CacheSpec ties
a cache to the model's weights, the data and its view settings, the seed and the
epochs; any difference is refused by LogitCache with a message naming the field.

Without augmentation (always so for text) a sample's view is the same in every epoch
and under every seed: the cache then holds one epoch (epoch_invariant) that serves
all of them. Text (TokenSet) samples are windows of L tokens, so a sample's logits are
(L, V) and the cache stores L rows per sample.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from smskd_fast.training.logit_cache import CacheSpec, LogitCache, TopKLogits, build, data_fingerprint, model_hash
from smskd_fast.training.config import CacheStoreConfig, RunConfig
from smskd_fast.training.data import ImageSet, TokenSet, augment, augmentation_draws
from smskd_fast.backends.topk import TopKTeacher

__all__ = ["training_view", "views_depend_on_epoch", "teacher_cache_spec", "reference_cache_spec",
           "open_or_build", "CachedLogits", "reference_cache_dir"]

Dataset = Union[ImageSet, TokenSet]


def views_depend_on_epoch(config: RunConfig) -> bool:
    """Whether a sample's training view changes with the epoch (and the seed): only through augmentation."""
    return config.data.augment != "none"


def training_view(dataset: Dataset, images: torch.Tensor, indices: torch.Tensor, config: RunConfig,
                  epoch: int) -> torch.Tensor:
    """The normalized training view of a batch: the same for a sample in every stage, batch and run."""
    draws = augmentation_draws(config.seed, epoch, indices)
    return dataset.normalize(augment(images, config.data.augment, draws, config.data.crop_padding))


def _view_fingerprint(dataset: Dataset, config: RunConfig) -> str:
    """The data plus everything that shapes a view: images, labels, augmentation and normalization;
    or, for text, the token windows (the targets are the same windows shifted: nothing more to hash)."""
    if isinstance(dataset, TokenSet):
        settings = repr(("sequence", config.data.augment, dataset.num_classes))
        return data_fingerprint([dataset.windows.numpy(), np.frombuffer(settings.encode(), dtype=np.uint8)])
    if dataset.images is None:
        raise ValueError(f"a logit cache needs a data set held in memory (digits, glyphs, cifar100, text); data.name "
                         f"{config.data.name!r} loads its images lazily")
    settings = repr((config.data.augment, config.data.crop_padding, dataset.scale, dataset.mean, dataset.std))
    return data_fingerprint([dataset.images.numpy(), dataset.labels.numpy(),
                             np.frombuffer(settings.encode(), dtype=np.uint8)])


def _spec(store: CacheStoreConfig, model: nn.Module, dataset: Dataset, config: RunConfig, epochs: int,
          temperatures: Tuple[float, ...]) -> CacheSpec:
    per_epoch = views_depend_on_epoch(config)
    return CacheSpec(
        model_hash=model_hash(model), data_fingerprint=_view_fingerprint(dataset, config),
        augmentation_seed=config.seed if per_epoch else None, epochs=tuple(range(epochs if per_epoch else 1)),
        num_samples=len(dataset), num_classes=dataset.num_classes, format=store.format, dtype=store.dtype,
        topk=store.k if store.format == "topk" else 0,
        temperatures=temperatures if store.format == "topk" else (), shard_rows=store.shard_rows,
        sequence_length=dataset.windows.shape[1] - 1 if isinstance(dataset, TokenSet) else 0,
        epoch_invariant=not per_epoch)


def teacher_cache_spec(config: RunConfig, teacher: nn.Module, dataset: Dataset) -> CacheSpec:
    """The teacher cache of a run: every epoch index any stage uses (one epoch when the views do not
    depend on it), every stage temperature (top-k)."""
    temperatures = tuple(sorted({float(stage.temperature) for stage in config.stages}))
    return _spec(config.cache.teacher, teacher, dataset, config, max(s.epochs for s in config.stages), temperatures)


def reference_cache_spec(config: RunConfig, stage_index: int, reference: nn.Module, dataset: Dataset) -> CacheSpec:
    """The reference cache of one stage: that stage's epochs, dense logits."""
    return _spec(config.cache.reference, reference, dataset, config, config.stages[stage_index].epochs, ())


def reference_cache_dir(config: RunConfig, run_dir: Path, stage_index: int) -> Path:
    """Where stage k's reference cache lives: cache.reference.dir (default <run>/reference_cache)/stage<k>."""
    base = Path(config.cache.reference.dir) if config.cache.reference.dir else run_dir / "reference_cache"
    return base / f"stage{stage_index + 1}"


@torch.inference_mode()
def _compute_logits(model: nn.Module, dataset: Dataset, config: RunConfig, batch_size: int,
                    device: torch.device, epoch: int, first: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model's logits (count, [L,] C) for samples [first, first + count) under epoch's views, and targets."""
    indices = torch.arange(first, first + count)
    logits, targets = [], []
    for start in range(0, count, batch_size):
        chunk = indices[start:start + batch_size]
        inputs, target = dataset.batch(chunk)
        logits.append(model(training_view(dataset, inputs, chunk, config, epoch).to(device)).float().cpu())
        targets.append(target)
    return torch.cat(logits), torch.cat(targets)


def open_or_build(path: Path, spec: CacheSpec, model: nn.Module, dataset: Dataset, config: RunConfig,
                  batch_size: int, device: torch.device, *, rank: int = 0, world_size: int = 1,
                  barrier: Callable[[], None] = lambda: None) -> Tuple[LogitCache, int]:
    """Opens the cache at path for spec, first writing whatever shards are missing (resumable).

    Under DDP every rank calls this with its rank: rank 0 creates (or resumes) the
    cache, then all ranks write their share of the missing shards in parallel.
    Returns the cache and the number of shards this rank wrote; refuses a cache built
    for another spec (CacheMismatchError) and detects corrupted shards on read.
    """
    if rank == 0:
        LogitCache.create_or_resume(path, spec)  # header, and leftovers of a killed build removed
    barrier()
    cache = LogitCache.attach(path, spec)
    was_training = model.training
    model.eval()
    try:
        written = build(cache, lambda epoch, first, count: _compute_logits(
            model, dataset, config, batch_size, device, epoch, first, count), rank=rank, world_size=world_size)
    finally:
        model.train(was_training)
    barrier()
    return LogitCache.open(path, spec), written


class CachedLogits:
    """Reads one stage's rows of a cache: dense logits, or the top-k teacher at the stage temperature."""

    def __init__(self, cache: LogitCache, temperature: float, device: torch.device):
        self.cache, self.device, self.temperature = cache, device, float(temperature)
        self._temperature_column = (1 + cache.spec.temperatures.index(float(temperature))
                                    if cache.spec.format == "topk" else None)

    def read(self, epoch: int, indices: torch.Tensor, keep_stored_dtype: bool = False
             ) -> Tuple[Optional[torch.Tensor], Optional[TopKTeacher]]:
        """(dense logits, None) or (None, TopKTeacher) for the samples `indices` of `epoch`, shaped
        (B, [L,] ...). keep_stored_dtype: dense logits in the stored dtype (see LogitCache.read)."""
        rows = self.cache.read(epoch, indices.cpu().numpy(), keep_stored_dtype=keep_stored_dtype)
        if not isinstance(rows, TopKLogits):
            return rows.to(self.device), None
        lse = rows.log_sum_exp.to(self.device)
        return None, TopKTeacher(rows.values.to(self.device), rows.indices.to(self.device),
                                 rows.true_logit.to(self.device), lse[..., 0], lse[..., self._temperature_column],
                                 self.temperature)
