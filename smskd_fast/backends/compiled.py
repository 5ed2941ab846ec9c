"""Backends that call the compiled smskd_fast::smskd_loss_rows operator.

One class serves every device whose kernel csrc/ registers: the "cpu" backend
is the CPU kernel, the "cuda" backend the CUDA one. A backend is available
exactly when the loaded library has a kernel for its dispatch key, and accepts
the top-k teacher form when it also has a kernel of smskd_loss_rows_topk (CPU).
"""
from __future__ import annotations

import torch

from .. import ops
from .._extension import extension_error, extension_loaded
from .base import BackendStatus, LossOptions, RowInputs, RowOutputs


def needs_student_grad(student: torch.Tensor) -> bool:
    """Whether autograd will ask for d loss / d student."""
    return student.requires_grad and torch.is_grad_enabled()


class CompiledOpBackend:
    """Dispatches to the C++/CUDA operator for one device type."""

    def __init__(self, name: str, device_type: str, dispatch_key: str) -> None:
        self.name = name
        self.device_type = device_type
        self.dispatch_key = dispatch_key

    def status(self) -> BackendStatus:
        if not extension_loaded():
            return BackendStatus(False, str(extension_error()))
        if not torch._C._dispatch_has_kernel_for_dispatch_key(ops.OP_NAME, self.dispatch_key):
            hint = " (built with SMSKD_FAST_NO_CUDA=1, or without nvcc)" if self.device_type == "cuda" else ""
            return BackendStatus(
                False, f"smskd_fast._C is loaded but registers no {self.dispatch_key} kernel for {ops.OP_NAME}{hint}"
            )
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return BackendStatus(False, "smskd_fast._C has a CUDA kernel but no CUDA device is visible")
        return BackendStatus(True, f"smskd_fast._C loaded with its {self.dispatch_key} kernel")

    @property
    def supports_topk(self) -> bool:
        """Whether the library has this device's kernel of the top-k form (the CPU does; CUDA not yet)."""
        if not extension_loaded():
            return False
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(ops.TOPK_OP_NAME, self.dispatch_key)
        except RuntimeError:  # a library built before the top-k schema existed
            return False

    def supports(self, device: torch.device) -> bool:
        return device.type == self.device_type

    def rows(self, inputs: RowInputs, options: LossOptions) -> RowOutputs:
        if inputs.teacher_topk is not None:
            return self._topk_rows(inputs, options)
        loss, ce, kd, ref, tcp, weight, _ = torch.ops.smskd_fast.smskd_loss_rows(
            inputs.student,
            inputs.target,
            inputs.teacher,
            inputs.reference,
            float(options.temperature),
            float(options.ce_weight),
            float(options.kd_weight),
            float(options.ref_weight),
            options.weighting,
            int(options.ignore_index),
            needs_student_grad(inputs.student),
        )
        return RowOutputs(loss, ce.detach(), kd.detach(), ref.detach(), tcp.detach(), weight.detach())

    def _topk_rows(self, inputs: RowInputs, options: LossOptions) -> RowOutputs:
        teacher = inputs.teacher_topk
        loss, ce, kd, ref, tcp, weight, _ = torch.ops.smskd_fast.smskd_loss_rows_topk(
            inputs.student, inputs.target, teacher.values, teacher.indices, teacher.true_logit,
            teacher.log_sum_exp, teacher.log_sum_exp_at_temperature, inputs.reference,
            float(options.temperature), float(options.ce_weight), float(options.kd_weight),
            float(options.ref_weight), options.weighting, int(options.ignore_index),
            needs_student_grad(inputs.student),
        )
        return RowOutputs(loss, ce.detach(), kd.detach(), ref.detach(), tcp.detach(), weight.detach())
