"""The frozen models of a run: the teacher, each stage's reference, and their cached logits.

The teacher is loaded once and frozen for the run; from stage 2 on (unless the stage sets
reference: false or ref_weight 0) the reference is the student as the previous stage ended
it, frozen for the stage. Where the config has `cache:`, their logits are read from a logit
cache (frozen_logits.py, logit_cache.py) instead of running the model; a stage whose methods
need the teacher's features (or its dense logits, when the cache keeps only the top k) still
runs the teacher. Both models are checked unchanged at the end of each stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.training.checkpoint import load_model_file, load_weights
from smskd_fast.training.config import ModelConfig, RunConfig
from smskd_fast.training.data import ImageSet, TokenSet
from smskd_fast.training.distributed import DistributedContext
from smskd_fast.training.frozen_logits import (CachedLogits, open_or_build, reference_cache_dir, reference_cache_spec,
                                               teacher_cache_spec)
from smskd_fast.training.logit_cache import CacheSpec, LogitCache, model_hash
from smskd_fast.training.models import build_model

__all__ = ["freeze", "load_teacher", "FrozenLogits", "StageFrozenModels", "FrozenModels"]


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a frozen teacher or reference."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_teacher(spec: Optional[ModelConfig], num_classes: int, in_channels: int,
                 device: torch.device) -> Optional[nn.Module]:
    """The frozen teacher of the config (None without one), checked against the data's classes and channels."""
    if spec is None:
        return None
    if not spec.checkpoint:
        raise ValueError("teacher.checkpoint is required: the teacher must be trained "
                         "(see `smskd-fast train-teacher`); no weights are downloaded")
    entry = load_model_file(Path(spec.checkpoint), spec.name)
    if entry["num_classes"] != num_classes:
        raise ValueError(f"teacher {spec.checkpoint} has {entry['num_classes']} classes, the data "
                         f"{num_classes}; give a teacher trained on this data set")
    if entry.get("in_channels", in_channels) != in_channels:
        raise ValueError(f"teacher {spec.checkpoint} takes {entry['in_channels']}-channel images, the data has "
                         f"{in_channels}; give a teacher trained on this data set")
    teacher = build_model(spec.name, num_classes, in_channels)
    load_weights(teacher, entry["state_dict"], f"teacher.checkpoint {spec.checkpoint}",
                 "give a checkpoint of the model named in teacher.name")
    return freeze(teacher.to(device))


class FrozenLogits(NamedTuple):
    """A batch's frozen-model outputs; None for a model that has none (or that is run later, by a step)."""

    teacher: Optional[torch.Tensor]
    teacher_topk: Optional[TopKTeacher]
    reference: Optional[torch.Tensor]


class StageFrozenModels:
    """One stage's teacher and reference, and the caches that stand in for them where the config has them."""

    def __init__(self, teacher: Optional[nn.Module], teacher_fingerprint: Optional[str],
                 reference: Optional[nn.Module], teacher_cache: Optional[CachedLogits] = None,
                 reference_cache: Optional[CachedLogits] = None):
        self.teacher, self.teacher_fingerprint, self.reference = teacher, teacher_fingerprint, reference
        self.reference_fingerprint = None if reference is None else model_hash(reference)
        self.teacher_cache, self.reference_cache = teacher_cache, reference_cache

    @property
    def teacher_to_run(self) -> Optional[nn.Module]:
        """The teacher where its logits are not cached, else None."""
        return self.teacher if self.teacher_cache is None else None

    @property
    def reference_to_run(self) -> Optional[nn.Module]:
        """The reference where its logits are not cached, else None."""
        return self.reference if self.reference_cache is None else None

    def cached(self, epoch: int, indices: torch.Tensor, keep_stored_dtype: bool = False) -> FrozenLogits:
        """The logits the caches hold for a batch; None for a model without a cache."""
        teacher_logits = teacher_topk = reference_logits = None
        if self.teacher_cache is not None:
            teacher_logits, teacher_topk = self.teacher_cache.read(epoch, indices, keep_stored_dtype)
        if self.reference_cache is not None:
            reference_logits, _ = self.reference_cache.read(epoch, indices, keep_stored_dtype)
        return FrozenLogits(teacher_logits, teacher_topk, reference_logits)

    @torch.no_grad()
    def logits(self, epoch: int, inputs: torch.Tensor, indices: torch.Tensor) -> FrozenLogits:
        """A batch's teacher and reference logits: from the caches, or by running the models."""
        teacher_logits, teacher_topk, reference_logits = self.cached(epoch, indices)
        if self.teacher_to_run is not None:
            teacher_logits = self.teacher_to_run(inputs)
        if self.reference_to_run is not None:
            reference_logits = self.reference_to_run(inputs)
        return FrozenLogits(teacher_logits, teacher_topk, reference_logits)

    def check_unchanged(self, stage_name: str) -> None:
        """Fails if training changed a frozen model (a hook, a shared parameter, a method gone wrong)."""
        if self.reference is not None and model_hash(self.reference) != self.reference_fingerprint:
            raise RuntimeError(f"{stage_name}: the frozen reference model changed during the stage")
        if self.teacher is not None and model_hash(self.teacher) != self.teacher_fingerprint:
            raise RuntimeError(f"{stage_name}: the frozen teacher model changed during the stage")


class FrozenModels:
    """The run's teacher and teacher cache; makes each stage's StageFrozenModels."""

    def __init__(self, config: RunConfig, train: Union[ImageSet, TokenSet], run_dir: Path, device: torch.device,
                 dist: DistributedContext, log: Callable[[str], None]):
        self.config, self.train, self.run_dir, self.device, self.dist, self.log = (
            config, train, Path(run_dir), device, dist, log)
        self.teacher = load_teacher(config.teacher, train.num_classes, train.in_channels, device)
        self.teacher_fingerprint = None if self.teacher is None else model_hash(self.teacher)
        self.teacher_cache: Optional[LogitCache] = None  # opened by open_teacher_cache where the config has one

    def open_teacher_cache(self) -> None:
        """Opens the run's teacher cache, building any missing shards (`smskd-fast cache build` does it ahead)."""
        store = self.config.cache.teacher if self.config.cache is not None else None
        if store is None or self.teacher is None:
            return
        spec = teacher_cache_spec(self.config, self.teacher, self.train)
        self.teacher_cache, written = self._open_or_build(Path(store.dir), spec, self.teacher, store.batch_size)
        if written:
            self.log(f"teacher logit cache {store.dir}: wrote {written} shards")

    def for_stage(self, index: int, stage_name: str, methods: nn.ModuleList,
                  reference_weights: Optional[Dict[str, torch.Tensor]],
                  build: Callable[[], nn.Module]) -> StageFrozenModels:
        """Stage `index`'s frozen models; the reference is `build()` loaded with `reference_weights`
        (None: the stage has no reference)."""
        reference = None
        if reference_weights is not None:
            reference = build()
            reference.load_state_dict(reference_weights)
            freeze(reference)
        return StageFrozenModels(self.teacher, self.teacher_fingerprint, reference,
                                 self._stage_teacher_cache(index, methods),
                                 self._stage_reference_cache(index, stage_name, reference))

    def _open_or_build(self, path: Path, spec: CacheSpec, model: nn.Module, batch_size: int) -> Tuple[LogitCache, int]:
        """open_or_build with every rank writing its share of the missing shards in parallel."""
        return open_or_build(path, spec, model, self.train, self.config, batch_size, self.device,
                             rank=self.dist.rank, world_size=self.dist.world_size, barrier=self.dist.barrier)

    def _stage_teacher_cache(self, index: int, methods: nn.ModuleList) -> Optional[CachedLogits]:
        """The teacher cache for this stage, or None where the teacher must run: its features are
        needed, or a method needs its dense logits and the cache keeps only the top k."""
        cache = self.teacher_cache
        if cache is None:
            return None
        topk = cache.spec.format == "topk"
        if any(m.teacher_layers or (topk and m.reads_teacher_logits) for m in methods):
            return None
        return CachedLogits(cache, self.config.stages[index].temperature, self.device)

    def _stage_reference_cache(self, index: int, stage_name: str,
                               reference: Optional[nn.Module]) -> Optional[CachedLogits]:
        """Builds (or reuses, on resume) this stage's reference cache from the frozen reference."""
        store = self.config.cache.reference if self.config.cache is not None else None
        if store is None or reference is None:
            return None
        spec = reference_cache_spec(self.config, index, reference, self.train)
        path = reference_cache_dir(self.config, self.run_dir, index)
        cache, written = self._open_or_build(path, spec, reference, store.batch_size)
        if written:
            self.log(f"{stage_name}: reference logit cache {path}: wrote {written} shards")
        return CachedLogits(cache, self.config.stages[index].temperature, self.device)
