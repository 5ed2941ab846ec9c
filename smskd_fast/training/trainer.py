"""The SMSKD trainer: a run is a list of stages trained in sequence.

Stage k trains the student with its method(s) against the frozen teacher. From
stage 2 on (unless the stage sets reference: false), a frozen copy of the student
as it ended stage k-1 is the reference, and the TCP-weighted reference term of
SPEC.md joins the loss. This module is the stage and epoch loop; the layers below it:

- stage.py: a stage's methods, feature taps and optimizer (optim.py's registries);
- steps.py: one step's (loss, parts, predictions), for full logits (the fused
  smskd_loss plus the feature and relation methods' losses) and for fused_linear
  stages (fused_linear_smskd_loss from hidden states, for language models);
- frozen_models.py: the teacher and each stage's reference, or their cached logits;
- checkpoint.py: latest.pt and stageK.pt, written atomically, and resume;
- nonfinite.py: the stage's policy for a NaN or inf loss (stop, or skip the step).

Reproducibility and resume: every epoch reseeds torch from (seed, stage, epoch) and
draws its batch order from a generator seeded the same way; each sample's
augmentation is a function of (seed, epoch, sample index) alone; the learning rate
is a function of the epoch, and latest.pt (written after every epoch) holds the
student, the method modules and the optimizer. A run resumed from any epoch
boundary therefore ends with the same weights as one never stopped.

Under torchrun each process trains on its shard of every global batch with DDP; the
hooks (self.dist) are in distributed.py, and only rank 0 writes the run directory.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
import yaml
from torch import nn

from smskd_fast.training.checkpoint import ResumePoint, RunCheckpoints, load_model_file, load_weights, save_model_file
from smskd_fast.training.config import RunConfig, config_to_dict
from smskd_fast.training.config_record import changes_since_written
from smskd_fast.training.data import DataSplits, ImageSet, TokenSet, load_splits, split_validation
from smskd_fast.training.distributed import DistributedContext, all_gather_rows
from smskd_fast.training.evaluation import evaluate, summarize
from smskd_fast.training.config import uses_reference
from smskd_fast.training.frozen_models import FrozenModels
from smskd_fast.training.models import build_model
from smskd_fast.training.nonfinite import BufferSnapshot, NonFiniteLossError, describe_samples, stop_or_skip
from smskd_fast.training.optim import stage_learning_rate
from smskd_fast.training.optional_packages import require_matplotlib
from smskd_fast.training.progress import Progress
from smskd_fast.training.run_files import append_jsonl, read_jsonl, write_jsonl, write_text_atomic
from smskd_fast.training.seeds import derive_seed
from smskd_fast.training.stage import StageState, build_stage, check_methods
from smskd_fast.training.steps import StepResult, step_for, supports_fused_linear

__all__ = ["SMSKDTrainer", "HISTOGRAM_BINS"]

HISTOGRAM_BINS = 20


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
        self.frozen = FrozenModels(config, self.data.train, self.run_dir, self.device, self.dist, self.log)
        self.teacher = self.frozen.teacher
        self.checkpoints = RunCheckpoints(self.run_dir, self.device, self.dist.is_main)
        torch.manual_seed(derive_seed(config.seed, "student"))
        self.student = self._build_student()
        if config.student.checkpoint:
            entry = load_model_file(Path(config.student.checkpoint), config.student.name)
            load_weights(self.student, entry["state_dict"], f"student.checkpoint {config.student.checkpoint}",
                         "give a checkpoint of the model named in student.name")
        if any(stage.fused_linear for stage in config.stages):
            for role, model in (("student", self.student), ("teacher", self.teacher)):
                if model is not None and not supports_fused_linear(model):
                    raise ValueError(f"fused_linear: the {role} {getattr(config, role).name!r} does not expose "
                                     "hidden_states() and a linear `head`")
        check_methods(config, self.student, self.teacher)

    def _build_student(self) -> nn.Module:
        return build_model(self.config.student.name, self.num_classes, self.in_channels).to(self.device)

    def run(self, resume: bool = False, max_epochs: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Trains every stage; returns the summary, or None when stopped after max_epochs epochs
        (an interruption, for tests and time-boxed jobs; resume=True continues it)."""
        if self.config.plots:  # refused now, not after the last epoch
            require_matplotlib("plots: true (the run's PNG plots; plots: false goes without)")
        threads = torch.get_num_threads()
        if self.config.threads is not None:  # small models run faster on one thread than on a busy pool
            torch.set_num_threads(self.config.threads)
        try:
            return self._run(resume, max_epochs)
        finally:
            torch.set_num_threads(threads)

    def _run(self, resume: bool, max_epochs: Optional[int]) -> Optional[Dict[str, Any]]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        point = self._begin(resume)
        if self.teacher is not None and point.global_epoch == 0:
            self._evaluate_teacher()
        self.frozen.open_teacher_cache()
        global_epoch, histograms, epochs_run = point.global_epoch, point.histograms, 0
        for index in range(point.stage, len(self.config.stages)):
            stage, name = self.config.stages[index], self.stage_names[index]
            state = self._start_stage(index)
            first_epoch = point.restore_stage(index, state.methods, state.optimizer, str(self.checkpoints.latest_path))
            histogram = torch.zeros(HISTOGRAM_BINS)
            for epoch in range(first_epoch, stage.epochs):
                if max_epochs is not None and epochs_run >= max_epochs:
                    state.close()
                    return None
                started = time.monotonic()
                histogram.zero_()
                record = self._train_epoch(index, epoch, state, histogram)
                global_epoch += 1
                epochs_run += 1
                record = {"stage": index + 1, "stage_name": name, "epoch": epoch + 1, "global_epoch": global_epoch,
                          **record, **self._evaluate_student(), "seconds": time.monotonic() - started}
                if self.dist.is_main:
                    append_jsonl(self.run_dir / "metrics.jsonl", record)
                if epoch == stage.epochs - 1 and state.frozen.reference is not None:
                    histograms[name] = histogram.tolist()  # w_i of the last epoch, where a reference used it
                self.checkpoints.save_latest(index, epoch + 1, global_epoch, self.student, state.methods,
                                             state.optimizer, histograms)
                self.dist.barrier()  # no rank runs ahead of rank 0's checkpoint
                self.log(f"[{name}] epoch {epoch + 1}/{stage.epochs} loss {record['train_loss']:.4f} "
                         f"train {record['train_acc']:.2f}% test {record['test_acc']:.2f}%")
            self._finish_stage(index, state)
        summary = self._finish(histograms) if self.dist.is_main else None
        self.dist.barrier()
        return summary if summary is not None else summarize(read_jsonl(self.run_dir / "metrics.jsonl"))

    def _begin(self, resume: bool) -> ResumePoint:
        """Where the run starts: a new run writes config.yaml; a resumed one repairs metrics.jsonl
        (and a missing stage file) to match latest.pt. A run stopped in its first epoch starts again."""
        metrics_path, latest_path = self.run_dir / "metrics.jsonl", self.checkpoints.latest_path
        if resume and not latest_path.is_file() and (self.run_dir / "config.yaml").is_file():
            self.log(f"{latest_path} is not written yet (stopped in the first epoch): starting the run again")
            metrics_path.unlink(missing_ok=True)
            resume = False
        if resume:
            point = self.checkpoints.resume(self.student, [stage.epochs for stage in self.config.stages])
            if self.dist.is_main:
                write_jsonl(metrics_path, [r for r in read_jsonl(metrics_path)
                                           if r["global_epoch"] <= point.global_epoch])
                self._record_config_changes(point.global_epoch)
        else:
            if metrics_path.exists() or latest_path.exists():
                raise FileExistsError(f"{self.run_dir} already holds a run; use --resume or another --out")
            self.dist.barrier()  # every rank has checked before rank 0 writes
            if self.dist.is_main:
                write_text_atomic(self.run_dir / "config.yaml",
                                  yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
            point = ResumePoint()
        self.dist.barrier()  # rank 0's resume repairs (metrics, stage file) are on disk
        return point

    def _record_config_changes(self, epochs_done: int) -> None:
        """A run resumed with other values (`--resume --set ...`): config.yaml is rewritten to the values
        the rest of it trains with (eval and a later --resume read it), and config_changes.jsonl says
        from which epoch (written first: a kill in between repeats the record, never loses it)."""
        changes = changes_since_written(self.run_dir, self.config, ignore=())
        if not changes:
            return
        append_jsonl(self.run_dir / "config_changes.jsonl", {"from_global_epoch": epochs_done + 1, "changes": changes})
        write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
        self.log(f"resumed with values other than config.yaml's, which now holds them (config_changes.jsonl): "
                 f"{'; '.join(changes)}")

    def _evaluate(self, model: nn.Module, dataset: Union[ImageSet, TokenSet]) -> Dict[str, float]:
        return self.dist.evaluate(evaluate, model, dataset, self.config.data.eval_batch_size, self.device)

    def _evaluate_teacher(self) -> None:
        """teacher_eval.json: the teacher's test (and validation) figures, once per run."""
        result = self._evaluate(self.teacher, self.data.test)
        if self.data.validation is not None:
            validation = self._evaluate(self.teacher, self.data.validation)
            result.update({f"val_{key}": value for key, value in validation.items()})
        self.log(f"teacher {self.config.teacher.name}: test accuracy {result['acc']:.2f}%")
        if self.dist.is_main:
            write_text_atomic(self.run_dir / "teacher_eval.json", json.dumps(result))

    def _evaluate_student(self) -> Dict[str, float]:
        """The epoch record's test (and validation) figures of the student."""
        test = self._evaluate(self.student, self.data.test)
        validation = {} if self.data.validation is None else self._evaluate(self.student, self.data.validation)
        return {"test_loss": test["loss"], "test_acc": test["acc"],
                **({"test_perplexity": test["perplexity"]} if "perplexity" in test else {}),
                **{f"val_{key}": value for key, value in validation.items()}}

    def _start_stage(self, index: int) -> StageState:
        stage = self.config.stages[index]
        reference = self.checkpoints.load_stage(index - 1)["student"] if uses_reference(stage, index) else None
        return build_stage(self.config, index, self.stage_names[index], self.student, self.frozen, self.data.train,
                           self.device, self.dist, reference, self._build_student)

    def _finish_stage(self, index: int, state: StageState) -> None:
        """Checks the frozen models, writes stageK.pt (the next stage's reference) and removes the taps."""
        state.frozen.check_unchanged(self.stage_names[index])
        self.checkpoints.save_stage(index, self.student.state_dict(), state.methods.state_dict())
        self.dist.barrier()  # the next stage's reference is read from this file on every rank
        state.close()

    def _train_epoch(self, index: int, epoch: int, state: StageState, histogram: torch.Tensor) -> Dict[str, float]:
        """One epoch of stage `index`; returns its train_* figures and lr, adds the TCP weights to `histogram`."""
        stage, config = self.config.stages[index], self.config
        torch.manual_seed(derive_seed(config.seed, index, epoch))
        generator = torch.Generator().manual_seed(derive_seed(config.seed, index, epoch, "data"))  # batch order
        lr = stage_learning_rate(config, index, epoch)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        for method in state.methods:
            method.set_epoch(epoch)
        self.student.train()
        state.methods.train()
        sums = dict(loss=0.0, ce=0.0, kd=0.0, ref=0.0, method=0.0, weight=0.0)
        correct = count = skipped = taken = 0  # taken: steps run (under torchrun a tiny last global batch is not)
        train, step_loss = self.data.train, step_for(stage)
        steps = math.ceil(len(train) / config.data.batch_size)
        progress = Progress(steps, f"{self.stage_names[index]} epoch {epoch + 1}/{stage.epochs}",
                            config.progress and self.dist.is_main)
        batches = self.dist.batches(train, config.data.batch_size, generator, config.data.augment,  # this rank's
                                    config.data.crop_padding, config.seed, epoch)  # shard of each global batch
        for step, (images, labels, indices) in enumerate(batches, start=1):
            taken = step
            snapshot = BufferSnapshot([self.student, state.methods]) if stage.nonfinite == "skip" else None
            images, labels = train.normalize(images).to(self.device), labels.to(self.device)
            result = step_loss(self.student, state, stage, config.backend, epoch, images, labels, indices)
            if not self._all_ranks_finite(result.loss):  # under DDP every rank skips or stops together
                stop_or_skip(self._nonfinite_where(index, epoch, f"step {step}/{steps}", result, indices),
                             "Lower the learning rate or the method weights, check those samples, or skip such steps "
                             f"with `nonfinite: skip` (resume with `smskd-fast train --resume {self.run_dir} "
                             f"--set stages.{index}.nonfinite=skip`)", snapshot, self.log)
                skipped += 1
                progress.step("skipped")
                continue
            state.optimizer.zero_grad(set_to_none=True)
            (result.loss * batches.loss_scale(int(labels.shape[0]))).backward()
            state.optimizer.step()
            size = labels.numel()  # samples, or tokens for sequence data
            for key, value in {"loss": result.loss, **result.parts.scalars()}.items():
                sums[key] += float(value.detach()) * size
            if state.frozen.reference is not None:
                histogram += torch.histc(result.parts.weight.detach().float().cpu(), HISTOGRAM_BINS, 0.0, 1.0)
            correct += int((result.predictions == labels).sum())
            count += size
            progress.step(f"loss {float(result.loss.detach()):.4f}")
        progress.close()
        if taken and skipped == taken:
            raise NonFiniteLossError(f"{self.stage_names[index]}, epoch {epoch + 1}: the loss was non-finite on every "
                                     f"one of the {taken} steps (all skipped): the model has diverged; lower the "
                                     "learning rate or the method weights and start again")
        sums, correct, count = self.dist.reduce_totals(sums, correct, count)
        self.dist.all_reduce_(histogram)
        self.dist.average_batchnorm_statistics(self.student, state.methods)
        record = {f"train_{key}": value / max(count, 1) for key, value in sums.items()}
        record["train_skipped_steps"] = skipped
        record["train_acc"] = 100.0 * correct / max(count, 1)
        record["lr"] = lr
        return record

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on this rank and, under torchrun, on every other rank too."""
        bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
        return float(self.dist.all_reduce_(bad)) == 0.0

    def _nonfinite_where(self, index: int, epoch: int, step: str, result: StepResult, indices: torch.Tensor) -> str:
        """Where a non-finite loss happened, with its parts and the batch's samples."""
        parts = result.parts
        values = torch.tensor([[float(value.detach()) for value in (result.loss, parts.ce, parts.kd, parts.ref,
                                                                    parts.method)]], dtype=torch.float64, device=self.device)
        # Under torchrun every rank stops here together: report the rank whose loss is not finite, and the
        # whole global batch (one process's report of the same step).
        ranks, = all_gather_rows(values)
        loss, ce, kd, ref, method = ranks[(~torch.isfinite(ranks[:, 0])).nonzero()[0, 0]].tolist()
        indices, = all_gather_rows(indices.to(self.device))
        return (f"{self.stage_names[index]} (stage {index + 1} of {len(self.config.stages)}), epoch "
                f"{epoch + 1}/{self.config.stages[index].epochs}, {step}: the loss is {loss} "
                f"(ce {ce}, kd {kd}, ref {ref}, method {method}) on the batch of training samples "
                f"{describe_samples(indices)}")

    def _finish(self, histograms: Dict[str, Any]) -> Dict[str, Any]:
        """student.pt, tcp_weights.json and summary.json (and plots): the run's results."""
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
