"""Backends that call the compiled smskd_fast::smskd_loss_rows operator.

One class serves every device whose kernel csrc/ registers: the "cpu" backend
is the CPU kernel, the "cuda" backend the CUDA one. A backend is available
exactly when the loaded library has a kernel for its dispatch key, and accepts
the top-k teacher form when it also has a kernel of smskd_loss_rows_topk (CPU;
CUDA in a CUDA build).
"""
from __future__ import annotations

import torch

from smskd_fast.ops import registration as ops
from smskd_fast.ops import vmap_rules  # noqa: F401  (registers the ops' vmap rule)
from smskd_fast.ops import schema
from smskd_fast.ops.extension import extension_error, extension_loaded
from smskd_fast.backends.base import BackendStatus, LossOptions, RowInputs, RowOutputs, needs_student_grad


class GradientInStudent(torch.autograd.Function):
    """smskd_loss_rows_inplace_ under autograd: the forward writes d loss_i / d s_i over s.

    The student's own storage holds the row gradients (times grad_scale) until
    backward scales them in place by grad_output / grad_scale, so no N x C buffer is allocated at any point. The
    write bumps the student's version counter: autograd then refuses, rather
    than silently misuses, any saved use of the overwritten logits.
    """

    @staticmethod
    def forward(ctx, student, target, teacher, reference, grad_scale, reduction: str, options: LossOptions):
        storage = student.detach()
        outputs = torch.ops.smskd_fast.smskd_loss_rows_inplace_(
            storage, target, teacher, reference, *schema.scalar_arguments(options), grad_scale, reduction
        )
        ops.save_for_scaling(ctx, storage, grad_scale, target, options.ignore_index)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):
        return ops.scale_gradient_in_student_once(ctx, grad_loss), None, None, None, None, None, None


def can_overwrite_student(student: torch.Tensor, device_type: str) -> bool:
    """The in-place gradient runs eagerly on CUDA for (N, C) logits with contiguous columns.

    Under torch.compile the functional op is used instead: its graph then has
    no mutation of an autograd input to reason about; under vmap too, where
    GradientInStudent (an autograd.Function without a vmap rule) cannot run.
    """
    return (
        device_type == "cuda"
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and needs_student_grad(student)
        and student.dtype != torch.float64
        and (student.shape[-1] <= 1 or student.stride(-1) == 1)
    )


@torch.compiler.assume_constant_result
def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the loaded library registers op_name for dispatch_key; False for an op it does not define
    (a library built before it existed). A constant to torch.compile, which cannot trace the query."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op_name, dispatch_key)
    except RuntimeError:
        return False


class CompiledOpBackend:
    """Dispatches to the C++/CUDA operator for one device type."""

    reduces = True  # the ops reduce in their one dispatch (csrc/reduction_arg.h)
    checks_target = True  # the CPU op on the host (its message names the value), the CUDA kernels on the device

    def __init__(self, name: str, device_type: str, dispatch_key: str, *, float64: bool = True) -> None:
        self.name = name
        self.device_type = device_type
        self.dispatch_key = dispatch_key
        self.float64 = float64  # the CUDA kernels refuse float64 (use the reference there)

    def status(self) -> BackendStatus:
        if not extension_loaded():
            return BackendStatus(False, str(extension_error()))
        if not has_kernel(ops.OP_NAME, self.dispatch_key):
            hint = " (built with SMSKD_FAST_NO_CUDA=1, or without nvcc)" if self.device_type == "cuda" else ""
            return BackendStatus(
                False, f"smskd_fast._C is loaded but registers no {self.dispatch_key} kernel for {ops.OP_NAME}{hint}"
            )
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return BackendStatus(False, "smskd_fast._C has a CUDA kernel but no CUDA device is visible")
        return BackendStatus(True, f"smskd_fast._C loaded with its {self.dispatch_key} kernel")

    @property
    def supports_topk(self) -> bool:
        """Whether the library has this device's kernel of the top-k form (CPU; CUDA in a CUDA build)."""
        if not extension_loaded():
            return False
        return has_kernel(ops.TOPK_OP_NAME, self.dispatch_key)

    def supports(self, device: torch.device) -> bool:
        return device.type == self.device_type

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return self.float64 or dtype != torch.float64

    def rows(self, inputs: RowInputs, options: LossOptions) -> RowOutputs:
        if inputs.teacher_topk is not None:
            return self._topk_rows(inputs, options)
        if options.overwrite_student_logits and can_overwrite_student(inputs.student, self.device_type):
            outputs = GradientInStudent.apply(inputs.student, inputs.target, inputs.teacher, inputs.reference,
                                              inputs.grad_scale, inputs.reduction, options)
        else:
            outputs = ops.call_functional_op(
                torch.ops.smskd_fast.smskd_loss_rows,
                inputs.student, inputs.target, inputs.teacher, inputs.reference,
                *schema.scalar_arguments(options), needs_student_grad(inputs.student), inputs.grad_scale,
                inputs.reduction,
            )
        return schema.row_outputs(outputs)

    def _topk_rows(self, inputs: RowInputs, options: LossOptions) -> RowOutputs:
        teacher = inputs.teacher_topk
        outputs = ops.call_functional_op(
            torch.ops.smskd_fast.smskd_loss_rows_topk,
            inputs.student, inputs.target, teacher.values, teacher.indices, teacher.true_logit,
            teacher.log_sum_exp, teacher.log_sum_exp_at_temperature, inputs.reference,
            *schema.scalar_arguments(options), needs_student_grad(inputs.student), inputs.grad_scale,
            inputs.reduction,
        )
        return schema.row_outputs(outputs)
