"""The SMSKD trainer: a run is a list of stages trained in sequence.

Stage k trains the student with its method(s) against the frozen teacher. From
stage 2 on (unless the stage sets reference: false), a frozen copy of the student
as it ended stage k-1 is the reference, and the TCP-weighted reference term of
SPEC.md joins the loss. The CE, Hinton-KD and reference terms are one fused
smskd_loss call; feature and relation methods add their own losses.

Sequence data (language models) works the same way: logits (B, L, V) and targets
(B, L) go straight into smskd_loss, accuracy counts tokens, and the evaluation adds
perplexity. A stage with fused_linear: true computes the loss from the models'
hidden states with fused_linear_smskd_loss instead of from full logits.

With `cache:` in the config, the teacher's (and each stage's reference's) logits are
read from a logit cache instead of running the frozen model (frozen_logits.py), in
the logits path and in the fused_linear path alike; a stage whose methods need
teacher features still runs the teacher.

Reproducibility and resume: every epoch reseeds torch from (seed, stage, epoch) and
draws its batch order from a generator seeded the same way; each sample's
augmentation is a function of (seed, epoch, sample index) alone; the
learning rate is a function of the epoch, and latest.pt (written atomically after
every epoch) holds the student, the method modules and the optimizer. A run resumed
from any epoch boundary therefore ends with the same weights as one never stopped.

Under torchrun each process trains on its shard of every global batch with DDP; the
hooks (self.dist) are in distributed.py, and only rank 0 writes the run directory.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import yaml
from torch import nn

from smskd_fast.training.config import RunConfig, StageConfig, config_to_dict
from smskd_fast.training.data import DataSplits, ImageSet, TokenSet, iterate_batches, load_splits, split_validation
from smskd_fast.training.distributed import DistributedContext, student_hidden_states
from smskd_fast.training.logit_cache import CacheSpec, model_hash
from smskd_fast.training.frozen_logits import CachedLogits, open_or_build, reference_cache_dir, reference_cache_spec, teacher_cache_spec
from smskd_fast.loss.functional import SMSKDLossOutput, smskd_loss
from smskd_fast.loss.fused_linear import fused_linear_smskd_loss
from smskd_fast.training.methods import FeatureTaps, MethodInputs, build_method
from smskd_fast.training.models import build_model
from smskd_fast.training.nonfinite import BufferSnapshot, NonFiniteLossError, describe_samples
from smskd_fast.training.run_files import (Progress, append_jsonl, load_model_file, load_weights, read_jsonl, save_atomic,
                    save_model_file, write_jsonl, write_text_atomic)
from smskd_fast.backends.topk import TopKTeacher

__all__ = ["SMSKDTrainer", "stage_loss", "fused_linear_stage_loss", "supports_fused_linear", "learning_rate", "derive_seed", "evaluate", "freeze",
           "HISTOGRAM_BINS"]

HISTOGRAM_BINS = 20
RESUME_REMEDY = "resume with the run's own config (no --set that changes its models or methods)"


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed determined by the run seed and a path such as (stage, epoch)."""
    digest = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def learning_rate(stage: StageConfig, epoch: int, start: int = 0, span: Optional[int] = None) -> float:
    """The stage's learning rate for its 0-based epoch `epoch`.

    With schedule_scope "stage" (start 0, span the stage's epochs) every stage runs its
    schedule afresh; with "run" the stage's epoch is epoch `start + epoch` of one schedule
    spanning all `span` epochs of the run (cosine over the run, global milestones), the
    schedule a single-stage baseline of the same total epochs gets.
    """
    base, schedule = stage.optimizer.lr, stage.schedule
    position, length = start + epoch, stage.epochs if span is None else span
    if schedule.name == "multistep":
        return base * schedule.gamma ** sum(position >= milestone for milestone in schedule.milestones)
    if schedule.name == "cosine":
        return 0.5 * base * (1 + math.cos(math.pi * position / length))
    return base


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a frozen teacher or reference."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def stage_loss(student_logits: torch.Tensor, target: torch.Tensor, teacher_logits: Optional[torch.Tensor],
               reference_logits: Optional[torch.Tensor], stage: StageConfig, fused_kd_weight: float,
               backend: str = "auto", teacher_topk: Optional[TopKTeacher] = None) -> SMSKDLossOutput:
    """The fused CE + KD + TCP-weighted reference term of one batch (SPEC.md section 2).

    Without a teacher the weighting falls back to "constant" (no TCP exists), which
    the config only allows when no reference term needs it.
    """
    has_teacher = teacher_logits is not None or teacher_topk is not None
    weighting = stage.weighting if has_teacher else "constant"
    return smskd_loss(student_logits, target, teacher_logits, reference_logits,
                      temperature=stage.temperature, ce_weight=stage.ce_weight, kd_weight=fused_kd_weight,
                      ref_weight=stage.ref_weight if reference_logits is not None else 0.0,
                      weighting=weighting, backend=backend, teacher_topk=teacher_topk)


def supports_fused_linear(model: nn.Module) -> bool:
    """Whether `model` exposes hidden_states(inputs) and a linear output projection `head`."""
    return callable(getattr(model, "hidden_states", None)) and isinstance(getattr(model, "head", None), nn.Linear)


def fused_linear_stage_loss(student: nn.Module, teacher: Optional[nn.Module], reference: Optional[nn.Module],
                            inputs: torch.Tensor, target: torch.Tensor, stage: StageConfig, fused_kd_weight: float,
                            backend: str = "auto", *, teacher_logits: Optional[torch.Tensor] = None,
                            teacher_topk: Optional[TopKTeacher] = None,
                            reference_logits: Optional[torch.Tensor] = None,
                            student_forward: Optional[nn.Module] = None) -> Tuple[SMSKDLossOutput, torch.Tensor]:
    """stage_loss from the models' hidden states and heads (fused_linear_smskd_loss: one chunk of
    tokens' logits at a time, never all of them), and the student's predicted classes.

    A frozen model whose logits come from a cache (teacher_logits or teacher_topk,
    reference_logits) is given as None and is not run. student_forward is what
    DistributedContext.wrap returned (the student's hidden states then come through DDP).
    """
    with torch.no_grad():
        teacher_hidden = teacher.hidden_states(inputs) if teacher is not None else None
        reference_hidden = reference.hidden_states(inputs) if reference is not None else None
    hidden = student_hidden_states(student if student_forward is None else student_forward, inputs)

    def head(model: Optional[nn.Module]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return (None, None) if model is None else (model.head.weight, model.head.bias)

    (student_weight, student_bias), (teacher_weight, teacher_bias) = head(student), head(teacher)
    reference_weight, reference_bias = head(reference)
    has_teacher = teacher is not None or teacher_logits is not None or teacher_topk is not None
    has_reference = reference is not None or reference_logits is not None
    loss = fused_linear_smskd_loss(
        hidden, student_weight, target, teacher_hidden, teacher_weight, teacher_logits, reference_hidden,
        reference_weight, student_head_bias=student_bias, teacher_head_bias=teacher_bias,
        reference_head_bias=reference_bias, temperature=stage.temperature, ce_weight=stage.ce_weight,
        kd_weight=fused_kd_weight, ref_weight=stage.ref_weight if has_reference else 0.0,
        weighting=stage.weighting if has_teacher else "constant", backend=backend, teacher_topk=teacher_topk,
        reference_logits=reference_logits)
    return loss, _chunked_argmax(hidden.detach(), student.head)


@torch.no_grad()
def _chunked_argmax(hidden: torch.Tensor, head: nn.Linear, rows: int = 4096) -> torch.Tensor:
    """argmax(head(hidden), -1) computed `rows` tokens at a time."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunks = [head(flat[start:start + rows]).argmax(-1) for start in range(0, flat.shape[0], rows)]
    return torch.cat(chunks).reshape(hidden.shape[:-1])


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Union[ImageSet, TokenSet], batch_size: int, device: torch.device) -> Dict[str, float]:
    """Test loss (CE) and top-1 accuracy (%) of `model` on `dataset`, per token for sequence data,
    which also gets perplexity (exp of the mean token CE); restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for images, labels, _ in iterate_batches(dataset, batch_size, shuffle=False):
        images, labels = dataset.normalize(images).to(device), labels.to(device)
        logits = model(images)
        total_loss += float(nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += labels.numel()
    model.train(was_training)
    result = {"loss": total_loss / max(count, 1), "acc": 100.0 * correct / max(count, 1)}
    if dataset.task == "sequence":
        result["perplexity"] = math.exp(result["loss"])
    return result


def _check_device_and_backend(device: torch.device, backend: str) -> None:
    """Fails before any work when the device or the loss backend cannot run here."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; use --device cpu")
    if backend != "auto":
        from smskd_fast.backends.registry import get_backend

        try:
            get_backend(backend, device)
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"backend: {error}; set backend: auto to let smskd-fast choose") from None


@dataclass
class _StageState:
    """What one stage trains: its methods, optimizer, feature taps and reference."""

    methods: nn.ModuleList
    optimizer: torch.optim.Optimizer
    student_taps: FeatureTaps
    teacher_taps: Optional[FeatureTaps]
    reference: Optional[nn.Module]
    reference_fingerprint: Optional[str]
    student_forward: nn.Module  # the student, or DDP over the student and methods (distributed.py)
    teacher_cache: Optional[CachedLogits] = None    # set: read the teacher's logits instead of running it
    reference_cache: Optional[CachedLogits] = None  # set: read the reference's logits instead of running it

    @property
    def fused_kd_weight(self) -> float:
        return sum(method.fused_kd_weight for method in self.methods)

    def close(self) -> None:
        self.student_taps.remove()
        if self.teacher_taps is not None:
            self.teacher_taps.remove()


class SMSKDTrainer:
    """Trains config.stages in sequence in run_dir; see the module docstring."""

    def __init__(self, config: RunConfig, run_dir: Path, log: Callable[[str], None] = print):
        self.config, self.run_dir, self.log = config, Path(run_dir), log
        _check_device_and_backend(torch.device(config.device), config.backend)
        self.dist, self.device = DistributedContext.from_environment(torch.device(config.device))
        if not self.dist.is_main:  # one log, from rank 0
            self.log = lambda message: None
        self.stage_names = config.stage_names()
        splits = load_splits(config.data.name, config.data.root, config.data.image_size, config.data.context_length)
        train, validation = split_validation(splits.train.subset(config.data.train_subset),
                                             config.data.validation_fraction)
        self.data = DataSplits(train=train, test=splits.test.subset(config.data.test_subset), validation=validation)
        self.num_classes = self.data.train.num_classes
        self.in_channels = self.data.train.in_channels
        self.teacher = self._load_teacher()
        self.teacher_fingerprint = None if self.teacher is None else model_hash(self.teacher)
        self._teacher_cache = None  # the run's teacher LogitCache, opened by run() when the config has one
        torch.manual_seed(derive_seed(config.seed, "student"))
        self.student = self._build(config.student.name)
        if config.student.checkpoint:
            entry = load_model_file(Path(config.student.checkpoint), config.student.name)
            load_weights(self.student, entry["state_dict"], f"student.checkpoint {config.student.checkpoint}",
                         "give a checkpoint of the model named in student.name")
        if any(stage.fused_linear for stage in config.stages):
            for role, model in (("student", self.student), ("teacher", self.teacher)):
                if model is not None and not supports_fused_linear(model):
                    raise ValueError(f"fused_linear: the {role} {getattr(config, role).name!r} does not expose "
                                     "hidden_states() and a linear `head`")
        for index in range(len(config.stages)):  # bad method parameters or layer names fail now, not stages later
            for method in self._methods(index):
                FeatureTaps(self.student, method.student_layers, "student").remove()
                if self.teacher is not None:
                    FeatureTaps(self.teacher, method.teacher_layers, "teacher").remove()

    # ----- set-up -------------------------------------------------------------------------
    def _build(self, name: str) -> nn.Module:
        return build_model(name, self.num_classes, self.in_channels).to(self.device)

    def _load_teacher(self) -> Optional[nn.Module]:
        spec = self.config.teacher
        if spec is None:
            return None
        if not spec.checkpoint:
            raise ValueError("teacher.checkpoint is required: the teacher must be trained "
                             "(see `smskd-fast train-teacher`); no weights are downloaded")
        entry = load_model_file(Path(spec.checkpoint), spec.name)
        if entry["num_classes"] != self.num_classes:
            raise ValueError(f"teacher {spec.checkpoint} has {entry['num_classes']} classes, the data "
                             f"{self.num_classes}; give a teacher trained on this data set")
        if entry.get("in_channels", self.in_channels) != self.in_channels:
            raise ValueError(f"teacher {spec.checkpoint} takes {entry['in_channels']}-channel images, the data has "
                             f"{self.in_channels}; give a teacher trained on this data set")
        teacher = build_model(spec.name, self.num_classes, self.in_channels)
        load_weights(teacher, entry["state_dict"], f"teacher.checkpoint {spec.checkpoint}",
                     "give a checkpoint of the model named in teacher.name")
        return freeze(teacher.to(self.device))

    def _probe_inputs(self, student_taps: FeatureTaps, teacher_taps: Optional[FeatureTaps]) -> MethodInputs:
        """Features of the first training batch (student in eval mode: its statistics stay untouched)."""
        images, labels, indices = next(iterate_batches(self.data.train, self.config.data.batch_size, shuffle=False))
        images = self.data.train.normalize(images).to(self.device)
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            student_logits = self.student(images)
            teacher_logits = self.teacher(images) if self.teacher is not None else None
        self.student.train(was_training)
        return MethodInputs(student_logits, teacher_logits, labels.to(self.device), indices,
                            student_taps.take(), teacher_taps.take() if teacher_taps else {})

    def _methods(self, index: int) -> nn.ModuleList:
        return nn.ModuleList([
            build_method(m.name, self.student, self.teacher, weight=m.weight, student_layers=m.student_layers,
                         teacher_layers=m.teacher_layers, params=m.params)
            for m in self.config.stages[index].methods
        ])

    def _start_stage(self, index: int) -> _StageState:
        stage = self.config.stages[index]
        torch.manual_seed(derive_seed(self.config.seed, index, "methods"))
        methods = self._methods(index)
        student_taps = FeatureTaps(self.student, [n for m in methods for n in m.student_layers], "student")
        teacher_taps = (FeatureTaps(self.teacher, [n for m in methods for n in m.teacher_layers], "teacher")
                        if self.teacher is not None else None)
        probe = self._probe_inputs(student_taps, teacher_taps)
        for method in methods:
            method.build(probe, len(self.data.train))
        methods.to(self.device)
        reference = None
        if index > 0 and stage.reference and stage.ref_weight > 0:
            reference = self._build(self.config.student.name)
            reference.load_state_dict(self._stage_checkpoint(index - 1)["student"])
            freeze(reference)
        parameters = list(self.student.parameters()) + list(methods.parameters())
        return _StageState(methods, self._optimizer(stage, parameters), student_taps, teacher_taps, reference,
                           None if reference is None else model_hash(reference),
                           self.dist.wrap(self.student, methods, self.device),
                           self._stage_teacher_cache(index, methods), self._stage_reference_cache(index, reference))

    # ----- logit caches (frozen_logits.py) ----------------------------------------------------
    def _open_teacher_cache(self) -> None:
        """Opens the run's teacher cache, building any missing shards (`smskd-fast cache build` does it ahead)."""
        store = self.config.cache.teacher if self.config.cache is not None else None
        if store is None or self.teacher is None:
            return
        spec = teacher_cache_spec(self.config, self.teacher, self.data.train)
        self._teacher_cache, written = self._open_or_build(Path(store.dir), spec, self.teacher, store.batch_size)
        if written:
            self.log(f"teacher logit cache {store.dir}: wrote {written} shards")

    def _open_or_build(self, path: Path, spec: CacheSpec, model: nn.Module, batch_size: int):
        """open_or_build with every rank writing its share of the missing shards in parallel."""
        return open_or_build(path, spec, model, self.data.train, self.config, batch_size, self.device,
                             rank=self.dist.rank, world_size=self.dist.world_size, barrier=self.dist.barrier)

    def _stage_teacher_cache(self, index: int, methods: nn.ModuleList) -> Optional[CachedLogits]:
        """The teacher cache for this stage, or None where the teacher must run: its features are
        needed, or a method needs its dense logits and the cache keeps only the top k."""
        cache = self._teacher_cache
        if cache is None:
            return None
        topk = cache.spec.format == "topk"
        if any(m.teacher_layers or (topk and m.reads_teacher_logits) for m in methods):
            return None
        return CachedLogits(cache, self.config.stages[index].temperature, self.device)

    def _stage_reference_cache(self, index: int, reference: Optional[nn.Module]) -> Optional[CachedLogits]:
        """Builds (or reuses, on resume) this stage's reference cache from the frozen reference."""
        store = self.config.cache.reference if self.config.cache is not None else None
        if store is None or reference is None:
            return None
        spec = reference_cache_spec(self.config, index, reference, self.data.train)
        path = reference_cache_dir(self.config, self.run_dir, index)
        cache, written = self._open_or_build(path, spec, reference, store.batch_size)
        if written:
            self.log(f"{self.stage_names[index]}: reference logit cache {path}: wrote {written} shards")
        return CachedLogits(cache, self.config.stages[index].temperature, self.device)

    @staticmethod
    def _cached_logits(state: _StageState, epoch: int, indices: torch.Tensor, keep_stored_dtype: bool = False):
        """(teacher logits, teacher top-k, reference logits) of a batch read from the stage's caches;
        None for a model without a cache."""
        teacher_logits = teacher_topk = reference_logits = None
        if state.teacher_cache is not None:
            teacher_logits, teacher_topk = state.teacher_cache.read(epoch, indices, keep_stored_dtype)
        if state.reference_cache is not None:
            reference_logits, _ = state.reference_cache.read(epoch, indices, keep_stored_dtype)
        return teacher_logits, teacher_topk, reference_logits

    def _frozen_logits(self, state: _StageState, epoch: int, images: torch.Tensor, indices: torch.Tensor):
        """(teacher logits, teacher top-k, reference logits) of a batch: from the caches or the models."""
        teacher_logits, teacher_topk, reference_logits = self._cached_logits(state, epoch, indices)
        if state.teacher_cache is None and self.teacher is not None:
            teacher_logits = self.teacher(images)
        if state.reference_cache is None and state.reference is not None:
            reference_logits = state.reference(images)
        return teacher_logits, teacher_topk, reference_logits

    @staticmethod
    def _optimizer(stage: StageConfig, parameters: List[nn.Parameter]) -> torch.optim.Optimizer:
        spec = stage.optimizer
        if spec.name == "sgd":
            return torch.optim.SGD(parameters, lr=spec.lr, momentum=spec.momentum,
                                   weight_decay=spec.weight_decay, nesterov=spec.nesterov)
        optimizer_class = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
        return optimizer_class(parameters, lr=spec.lr, weight_decay=spec.weight_decay)

    # ----- files ----------------------------------------------------------------------------
    def _stage_path(self, index: int) -> Path:
        return self.run_dir / "checkpoints" / f"stage{index + 1}.pt"

    def _stage_checkpoint(self, index: int) -> Dict[str, Any]:
        return torch.load(self._stage_path(index), map_location=self.device, weights_only=True)

    def _save_latest(self, stage_index: int, epochs_done: int, global_epoch: int, state: _StageState,
                     histograms: Dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        save_atomic({
            "stage": stage_index, "epochs_done": epochs_done, "global_epoch": global_epoch,
            "student": self.student.state_dict(), "methods": state.methods.state_dict(),
            "optimizer": state.optimizer.state_dict(), "histograms": histograms,
        }, self.run_dir / "checkpoints" / "latest.pt")

    # ----- training ---------------------------------------------------------------------------
    def _train_epoch(self, index: int, epoch: int, state: _StageState, histogram: torch.Tensor) -> Dict[str, float]:
        stage, config = self.config.stages[index], self.config
        torch.manual_seed(derive_seed(config.seed, index, epoch))
        generator = torch.Generator().manual_seed(derive_seed(config.seed, index, epoch, "data"))  # batch order
        if config.schedule_scope == "run":
            lr = learning_rate(stage, epoch, sum(s.epochs for s in config.stages[:index]),
                               sum(s.epochs for s in config.stages))
        else:
            lr = learning_rate(stage, epoch)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        for method in state.methods:
            method.set_epoch(epoch)
        self.student.train()
        state.methods.train()
        sums = dict(loss=0.0, ce=0.0, kd=0.0, ref=0.0, method=0.0, weight=0.0)
        correct = count = skipped = 0
        train = self.data.train
        steps = math.ceil(len(train) / config.data.batch_size)
        progress = Progress(steps, f"{self.stage_names[index]} epoch {epoch + 1}/{stage.epochs}",
                            config.progress and self.dist.is_main)
        batches = self.dist.batches(train, config.data.batch_size, generator, config.data.augment,  # this rank's
                                    config.data.crop_padding, config.seed, epoch)  # shard of each global batch
        for step, (images, labels, indices) in enumerate(batches, start=1):
            snapshot = BufferSnapshot([self.student, state.methods]) if stage.nonfinite == "skip" else None
            images = train.normalize(images).to(self.device)
            labels = labels.to(self.device)
            if stage.fused_linear:  # the config allows only methods without a loss of their own here
                teacher_logits, teacher_topk, reference_logits = self._cached_logits(
                    state, epoch, indices, keep_stored_dtype=True)  # converted a chunk at a time
                fused, predictions = fused_linear_stage_loss(
                    self.student, None if state.teacher_cache is not None else self.teacher,
                    None if state.reference_cache is not None else state.reference, images, labels, stage,
                    state.fused_kd_weight, config.backend, teacher_logits=teacher_logits, teacher_topk=teacher_topk,
                    reference_logits=reference_logits, student_forward=state.student_forward)
                method_loss = fused.loss.new_zeros(())
            else:
                with torch.no_grad():
                    teacher_logits, teacher_topk, reference_logits = self._frozen_logits(state, epoch, images,
                                                                                         indices)
                student_logits = state.student_forward(images)
                inputs = MethodInputs(student_logits, teacher_logits, labels, indices, state.student_taps.take(),
                                      state.teacher_taps.take() if state.teacher_taps else {})
                fused = stage_loss(student_logits, labels, teacher_logits, reference_logits, stage,
                                   state.fused_kd_weight, config.backend, teacher_topk)
                method_loss = sum((method.loss(inputs) for method in state.methods), student_logits.new_zeros(()))
                predictions = student_logits.argmax(-1)
            loss = fused.loss + method_loss
            if not self._all_ranks_finite(loss):  # under DDP every rank skips or stops together
                where = (f"{self.stage_names[index]} (stage {index + 1} of {len(config.stages)}), epoch "
                         f"{epoch + 1}/{stage.epochs}, step {step}/{steps}: the loss is {float(loss.detach())} "
                         f"(ce {float(fused.ce)}, kd {float(fused.kd)}, ref {float(fused.ref)}, "
                         f"method {float(method_loss.detach())}) on the batch of training samples "
                         f"{describe_samples(indices)}")
                if snapshot is None:
                    raise NonFiniteLossError(
                        f"{where}. Lower the learning rate or the method weights, check those samples, or skip such "
                        f"steps with `nonfinite: skip` (resume with `smskd-fast train --resume {self.run_dir} "
                        f"--set stages.{index}.nonfinite=skip`)")
                snapshot.restore()  # the forward pass updated BatchNorm statistics and method buffers
                skipped += 1
                self.log(f"skipped: {where}")
                progress.step("skipped")
                continue
            state.optimizer.zero_grad(set_to_none=True)
            (loss * batches.loss_scale(int(labels.shape[0]))).backward()
            state.optimizer.step()
            size = labels.numel()  # samples, or tokens for sequence data
            for key, value in (("loss", loss), ("ce", fused.ce), ("kd", fused.kd), ("ref", fused.ref),
                               ("method", method_loss), ("weight", fused.weight.float().mean())):
                sums[key] += float(value.detach()) * size
            if state.reference is not None:
                histogram += torch.histc(fused.weight.detach().float().cpu(), HISTOGRAM_BINS, 0.0, 1.0)
            correct += int((predictions == labels).sum())
            count += size
            progress.step(f"loss {float(loss.detach()):.4f}")
        progress.close()
        if skipped == steps:
            raise NonFiniteLossError(f"{self.stage_names[index]}, epoch {epoch + 1}: the loss was non-finite on every "
                                     f"one of the {steps} steps (all skipped): the model has diverged; lower the "
                                     "learning rate or the method weights and start again")
        sums, correct, count = self.dist.reduce_totals(sums, correct, count)
        self.dist.all_reduce_(histogram)
        self.dist.average_batchnorm_statistics(self.student, state.methods)
        record = {f"train_{key}": value / max(count, 1) for key, value in sums.items()}
        record["train_skipped_steps"] = skipped
        record["train_acc"] = 100.0 * correct / max(count, 1)
        record["lr"] = lr
        return record

    def run(self, resume: bool = False, max_epochs: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Trains every stage; returns the summary, or None when stopped after max_epochs epochs
        (an interruption, for tests and time-boxed jobs; resume=True continues it)."""
        threads = torch.get_num_threads()
        if self.config.threads is not None:  # small models run faster on one thread than on a busy pool
            torch.set_num_threads(self.config.threads)
        try:
            return self._run(resume, max_epochs)
        finally:
            torch.set_num_threads(threads)

    def _run(self, resume: bool, max_epochs: Optional[int]) -> Optional[Dict[str, Any]]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        start_stage, start_epoch, global_epoch, histograms, resumed = 0, 0, 0, {}, None
        latest_path = self.run_dir / "checkpoints" / "latest.pt"
        if resume and not latest_path.is_file() and (self.run_dir / "config.yaml").is_file():
            self.log(f"{latest_path} is not written yet (stopped in the first epoch): starting the run again")
            metrics_path.unlink(missing_ok=True)
            resume = False
        if resume:
            if not latest_path.is_file():
                raise FileNotFoundError(f"cannot resume: {latest_path} not found; {self.run_dir} holds no started "
                                        "run (start one with `smskd-fast train --config FILE --out RUN_DIR`)")
            resumed = self._load_latest(latest_path)
            load_weights(self.student, resumed["student"], str(latest_path), RESUME_REMEDY)
            start_stage, start_epoch = resumed["stage"], resumed["epochs_done"]
            global_epoch, histograms = resumed["global_epoch"], resumed["histograms"]
            if self.dist.is_main:
                write_jsonl(metrics_path, [r for r in read_jsonl(metrics_path) if r["global_epoch"] <= global_epoch])
            if start_epoch == self.config.stages[start_stage].epochs:
                if self.dist.is_main and not self._stage_path(start_stage).is_file():  # stopped between the two writes
                    save_atomic({"student": resumed["student"], "methods": resumed["methods"],
                                 "stage": start_stage}, self._stage_path(start_stage))
                start_stage, start_epoch, resumed = start_stage + 1, 0, None
        else:
            if metrics_path.exists() or latest_path.exists():
                raise FileExistsError(f"{self.run_dir} already holds a run; use --resume or another --out")
            self.dist.barrier()  # every rank has checked before rank 0 writes
            if self.dist.is_main:
                write_text_atomic(self.run_dir / "config.yaml",
                                  yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
        self.dist.barrier()  # rank 0's resume repairs (metrics, stage file) are on disk
        if self.teacher is not None and global_epoch == 0:
            teacher_eval = self.dist.evaluate(evaluate, self.teacher, self.data.test, self.config.data.eval_batch_size,
                                              self.device)
            if self.data.validation is not None:
                validation = self.dist.evaluate(evaluate, self.teacher, self.data.validation,
                                                self.config.data.eval_batch_size, self.device)
                teacher_eval.update({f"val_{key}": value for key, value in validation.items()})
            self.log(f"teacher {self.config.teacher.name}: test accuracy {teacher_eval['acc']:.2f}%")
            if self.dist.is_main:
                write_text_atomic(self.run_dir / "teacher_eval.json", json.dumps(teacher_eval))
        self._open_teacher_cache()
        epochs_run = 0
        for index in range(start_stage, len(self.config.stages)):
            stage, name = self.config.stages[index], self.stage_names[index]
            state = self._start_stage(index)
            histogram = torch.zeros(HISTOGRAM_BINS)
            if resumed is not None and index == start_stage:
                load_weights(state.methods, resumed["methods"], str(latest_path), RESUME_REMEDY)
                state.optimizer.load_state_dict(resumed["optimizer"])
            first_epoch = start_epoch if index == start_stage else 0
            for epoch in range(first_epoch, stage.epochs):
                if max_epochs is not None and epochs_run >= max_epochs:
                    state.close()
                    return None
                started = time.monotonic()
                histogram.zero_()
                record = self._train_epoch(index, epoch, state, histogram)
                test = self.dist.evaluate(evaluate, self.student, self.data.test, self.config.data.eval_batch_size,
                                          self.device)
                validation = {} if self.data.validation is None else self.dist.evaluate(
                    evaluate, self.student, self.data.validation, self.config.data.eval_batch_size, self.device)
                global_epoch += 1
                epochs_run += 1
                record = {"stage": index + 1, "stage_name": name, "epoch": epoch + 1, "global_epoch": global_epoch,
                          **record, "test_loss": test["loss"], "test_acc": test["acc"],
                          **({"test_perplexity": test["perplexity"]} if "perplexity" in test else {}),
                          **{f"val_{key}": value for key, value in validation.items()},
                          "seconds": time.monotonic() - started}
                if self.dist.is_main:
                    append_jsonl(metrics_path, record)
                if epoch == stage.epochs - 1 and state.reference is not None:
                    histograms[name] = histogram.tolist()  # w_i of the last epoch, where a reference used it
                self._save_latest(index, epoch + 1, global_epoch, state, histograms)
                self.dist.barrier()  # no rank runs ahead of rank 0's checkpoint
                self.log(f"[{name}] epoch {epoch + 1}/{stage.epochs} loss {record['train_loss']:.4f} "
                         f"train {record['train_acc']:.2f}% test {record['test_acc']:.2f}%")
            self._check_frozen(state, name)
            if self.dist.is_main:
                save_atomic({"student": self.student.state_dict(), "methods": state.methods.state_dict(),
                             "stage": index}, self._stage_path(index))
            self.dist.barrier()  # the next stage's reference is read from this file on every rank
            state.close()
        summary = self._finish(histograms) if self.dist.is_main else None
        self.dist.barrier()
        return summary if summary is not None else summarize(read_jsonl(metrics_path))

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on this rank and, under torchrun, on every other rank too."""
        bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
        return float(self.dist.all_reduce_(bad)) == 0.0

    def _load_latest(self, latest_path: Path) -> Dict[str, Any]:
        try:
            return torch.load(latest_path, map_location=self.device, weights_only=True)
        except Exception as error:  # checkpoints are written atomically: only outside damage gets here
            raise ValueError(f"cannot resume: {latest_path} is unreadable ({type(error).__name__}); the stage "
                             f"checkpoints beside it may still be read, or start again with another --out") from None

    def _check_frozen(self, state: _StageState, name: str) -> None:
        if state.reference is not None and model_hash(state.reference) != state.reference_fingerprint:
            raise RuntimeError(f"{name}: the frozen reference model changed during the stage")
        if self.teacher is not None and model_hash(self.teacher) != self.teacher_fingerprint:
            raise RuntimeError(f"{name}: the frozen teacher model changed during the stage")

    def _finish(self, histograms: Dict[str, Any]) -> Dict[str, Any]:
        save_model_file(self.student, self.config.student.name, self.num_classes, self.in_channels,
                        self.run_dir / "student.pt")
        records = read_jsonl(self.run_dir / "metrics.jsonl")
        write_text_atomic(self.run_dir / "tcp_weights.json", json.dumps(
            {"bins": [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)], "counts": histograms}))
        summary = summarize(records)
        teacher_eval = self.run_dir / "teacher_eval.json"
        if teacher_eval.is_file():
            teacher_result = json.loads(teacher_eval.read_text())
            summary["teacher_test_acc"] = teacher_result["acc"]
            if "val_acc" in teacher_result:
                summary["teacher_val_acc"] = teacher_result["val_acc"]
        write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        if self.config.plots:
            from smskd_fast.training.plots import plot_run

            plot_run(self.run_dir)
        return summary


def summarize(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Last-epoch and best-epoch test accuracy overall and per stage (tables show the last epoch)."""
    best = max(records, key=lambda r: r["test_acc"])
    stages = []
    for name in dict.fromkeys(r["stage_name"] for r in records):
        rows = [r for r in records if r["stage_name"] == name]
        stages.append({"name": name, "last_test_acc": rows[-1]["test_acc"],
                       "best_test_acc": max(r["test_acc"] for r in rows),
                       "skipped_steps": sum(r.get("train_skipped_steps", 0) for r in rows)})
    summary = {"last_test_acc": records[-1]["test_acc"], "best_test_acc": best["test_acc"],
               "best_global_epoch": best["global_epoch"], "epochs": len(records), "stages": stages,
               "skipped_steps": sum(stage["skipped_steps"] for stage in stages),
               "table_shows": "last_test_acc"}
    if "val_acc" in records[-1]:  # a validation split was carved from the training data
        summary["last_val_acc"] = records[-1]["val_acc"]
    if "test_perplexity" in records[-1]:  # sequence data
        summary["last_test_perplexity"] = records[-1]["test_perplexity"]
        summary["best_test_perplexity"] = min(r["test_perplexity"] for r in records)
    return summary
