"""What every loss backend receives and returns: flattened rows in, per-row terms out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

import torch

# The weighting modes and the per-row outputs' structure are the operators' (ops/schema.py).
from smskd_fast.ops.reduction import as_class_indices
from smskd_fast.ops.schema import WEIGHTINGS, RowOutputs

if TYPE_CHECKING:
    from smskd_fast.backends.topk import TopKTeacher

__all__ = ["WEIGHTINGS", "RowOutputs", "LossOptions", "RowInputs", "BackendStatus", "Backend"]


@dataclass(frozen=True)
class LossOptions:
    """Scalar settings of the loss (SPEC.md section 2)."""

    temperature: float = 4.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    ref_weight: float = 1.0
    weighting: str = "inverse_tcp"
    ignore_index: int = -100
    # The caller allows a GPU backend to write the gradient into the student
    # logits' own storage (no extra N x C buffer); the logits' values are then lost.
    overwrite_student_logits: bool = False


@dataclass(frozen=True)
class RowInputs:
    """Validated inputs flattened to rows: logits (N, C), target (N,) or None.

    The teacher comes either as dense logits or, from a top-k logit cache, as
    teacher_topk (see smskd_fast/backends/topk.py); only backends whose supports_topk is
    True are given the latter. grad_scale is the factor that the caller's reduction
    will multiply every row's loss by (the mean's 1/n, a 0-d tensor in the
    accumulation dtype on the student's device), or None: backends that write the
    gradient in forward may fold it in (ops/schema.py, GRAD_SCALE); the per-row
    values are never scaled. reduction is "none" except for backends whose reduces
    is True: "sum" or "mean" then asks for loss, ce, kd and ref as 0-d sums over the
    rows (the mean's over the valid rows) and the gradient of that reduced loss
    (ops/schema.py, REDUCTION; grad_scale is then None).
    """

    student: torch.Tensor
    target: Optional[torch.Tensor]
    teacher: Optional[torch.Tensor]
    reference: Optional[torch.Tensor]
    teacher_topk: Optional["TopKTeacher"] = None
    grad_scale: Optional[torch.Tensor] = None
    reduction: str = "none"


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and why not. Truthy when available."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


class Backend(Protocol):
    """A loss implementation that the registry can dispatch to."""

    name: str
    supports_topk: bool  # accepts RowInputs.teacher_topk (absent means False)
    reduces: bool  # accepts RowInputs.reduction "sum" and "mean" (absent means False: the API reduces)
    checks_target: bool  # refuses target values outside [0, C) and ignore_index itself (absent: the API checks)

    def status(self) -> BackendStatus:
        """Whether this backend can run in this process, and why not."""

    def supports(self, device: torch.device) -> bool:
        """Whether this backend runs tensors on the given device."""

    # Optional: def supports_dtype(self, dtype) -> bool, for backends that refuse some
    # input dtypes (backend="auto" then passes over them for such inputs).

    def rows(self, inputs: RowInputs, options: LossOptions) -> RowOutputs:
        """Computes the per-row loss terms of SPEC.md section 2."""


def needs_student_grad(student: torch.Tensor) -> bool:
    """Whether autograd will ask for d loss / d student (the kernels then write the gradient).

    Seen through torch.func.vmap and torch.func.functionalize: their wrappers report requires_grad=False
    even when the tensor they wrap requires grad, and autograd then differentiates the op they call on
    that tensor. (torch.func.grad's wrapper reports its own level's requires_grad: not unwrapped.) Dynamo
    can trace neither get_unwrapped nor is_functionaltensor: under torch.compile a batched student asks for
    the gradient whenever grad mode is on (at worst one unused gradient, never a missing one)."""
    if torch.compiler.is_compiling():
        return torch.is_grad_enabled() and (student.requires_grad or torch._C._functorch.is_batchedtensor(student))
    while torch._C._functorch.is_batchedtensor(student) or torch._C._functorch.is_functionaltensor(student):
        student = torch._C._functorch.get_unwrapped(student)
    return student.requires_grad and torch.is_grad_enabled()


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every target in [0, num_classes) or equal to ignore_index (reads the values on the host); the first
    other value is named at its position in the tensor checked: smskd_loss checks its flattened rows, as
    the compiled ops do (target[i]), fused_linear_smskd_loss and true_class_probability the target as
    given (target[b, t])."""
    target = as_class_indices(target)
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        position = bad.nonzero()[0].tolist()
        where = f"target[{', '.join(map(str, position))}]" if position else "target"
        raise ValueError(
            f"target values must be in [0, {num_classes}) or equal ignore_index={ignore_index}, "
            f"found {int(target[tuple(position)])} at {where}"
        )
