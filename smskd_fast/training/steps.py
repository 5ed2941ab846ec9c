"""One training step's loss, for each loss path: (loss, parts, predictions).

The logits path runs the student to full logits and computes the fused CE + KD +
TCP-weighted reference term (smskd_loss, SPEC.md section 2) plus the stage's feature and
relation methods' own losses. The fused_linear path (language models) computes the same
fused term from the models' hidden states and heads with fused_linear_smskd_loss, one
chunk of tokens' logits at a time, never all of them. Frozen models whose logits are
cached are read, not run (frozen_models.py). Nothing here steps an optimizer: the trainer
decides what a non-finite loss does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.loss.functional import SMSKDLossOutput, smskd_loss
from smskd_fast.loss.fused_linear import fused_linear_smskd_loss
from smskd_fast.training.config import StageConfig
from smskd_fast.training.distributed import student_hidden_states
from smskd_fast.training.methods import MethodInputs
from smskd_fast.training.stage import StageState

__all__ = ["LossParts", "StepResult", "Step", "stage_loss", "supports_fused_linear", "fused_linear_stage_loss",
           "logits_step", "fused_linear_step", "step_for"]


@dataclass(frozen=True)
class LossParts:
    """The terms of a step's loss: ce, kd and ref as smskd_loss reports them (unweighted, detached),
    method (the methods' own weighted losses) and weight (each row's TCP weight w_i)."""

    ce: torch.Tensor
    kd: torch.Tensor
    ref: torch.Tensor
    method: torch.Tensor
    weight: torch.Tensor

    def scalars(self) -> Dict[str, torch.Tensor]:
        """The batch means the epoch's metrics record (train_ce, ..., train_weight)."""
        return {"ce": self.ce, "kd": self.kd, "ref": self.ref, "method": self.method,
                "weight": self.weight.float().mean()}


class StepResult(NamedTuple):
    """A step's differentiable total loss, its parts, and the student's predicted classes."""

    loss: torch.Tensor
    parts: LossParts
    predictions: torch.Tensor


Step = Callable[[nn.Module, StageState, StageConfig, str, int, torch.Tensor, torch.Tensor, torch.Tensor], StepResult]


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


def _result(fused: SMSKDLossOutput, method_loss: torch.Tensor, predictions: torch.Tensor) -> StepResult:
    return StepResult(fused.loss + method_loss, LossParts(fused.ce, fused.kd, fused.ref, method_loss, fused.weight),
                      predictions)


def logits_step(student: nn.Module, state: StageState, stage: StageConfig, backend: str, epoch: int,
                inputs: torch.Tensor, target: torch.Tensor, indices: torch.Tensor) -> StepResult:
    """The logits path: the student's full logits, the fused term and the methods' own losses."""
    teacher_logits, teacher_topk, reference_logits = state.frozen.logits(epoch, inputs, indices)
    student_logits = state.student_forward(inputs)
    method_inputs = MethodInputs(student_logits, teacher_logits, target, indices, state.student_taps.take(),
                                 state.teacher_taps.take() if state.teacher_taps else {})
    fused = stage_loss(student_logits, target, teacher_logits, reference_logits, stage, state.fused_kd_weight,
                       backend, teacher_topk)
    method_loss = sum((method.loss(method_inputs) for method in state.methods), student_logits.new_zeros(()))
    return _result(fused, method_loss, student_logits.argmax(-1))


def fused_linear_step(student: nn.Module, state: StageState, stage: StageConfig, backend: str, epoch: int,
                      inputs: torch.Tensor, target: torch.Tensor, indices: torch.Tensor) -> StepResult:
    """The fused_linear path: the fused term from hidden states and heads (the config allows only
    methods without a loss of their own here); cached logits stay in their stored dtype and are
    converted a chunk at a time."""
    frozen = state.frozen
    teacher_logits, teacher_topk, reference_logits = frozen.cached(epoch, indices, keep_stored_dtype=True)
    fused, predictions = fused_linear_stage_loss(
        student, frozen.teacher_to_run, frozen.reference_to_run, inputs, target, stage, state.fused_kd_weight,
        backend, teacher_logits=teacher_logits, teacher_topk=teacher_topk, reference_logits=reference_logits,
        student_forward=state.student_forward)
    return _result(fused, fused.loss.new_zeros(()), predictions)


def step_for(stage: StageConfig) -> Step:
    """The step of the stage's loss path."""
    return fused_linear_step if stage.fused_linear else logits_step

