"""The "triton" backend: the Triton kernels as the custom ops smskd_fast::smskd_loss_rows(_topk)_triton.

The ops have the schemas of smskd_fast::smskd_loss_rows and smskd_loss_rows_topk
(csrc/ops.cpp; the teacher dense or in the top-k form of a logit cache) under
their own names, so the backends are interchangeable; they are
torch.library.triton_ops, so torch.compile(fullgraph=True) sees the kernels, and
they share the fake kernels and the autograd formula of smskd_fast/ops/registration.py
(the forward writes the gradient times the op's grad_scale, the kernels
multiplying their per-row coefficients by it; backward scales it by
grad_output / grad_scale, and leaves it untouched when that is 1).

overwrite_student_logits: when the caller allows it, the student logits need a
gradient, and we are not being traced by torch.compile, the backend bypasses the
functional op and runs the same kernels through _OverwriteStudentRows, an
autograd.Function that writes the gradient into the student logits' own storage
(a custom op may not alias an output to an input, so this cannot be the op
itself) and scales it in place in backward, for the dense and the top-k teacher
alike (the top-k kernel writes each column once, after its last read). Under
torch.compile the functional op runs and a fresh gradient buffer is allocated:
the option is a permission, not a promise.

Availability: triton must import, and either a CUDA device is visible or the
kernels were built by Triton's interpreter (TRITON_INTERPRET=1 set before triton
was first imported), which runs them on CPU tensors, slowly, for tests.
float64 logits are refused with a TypeError naming the alternatives.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from smskd_fast.ops import registration as ops
from smskd_fast.ops import schema
from smskd_fast.ops.reduction import reduce_per_row_outputs, reduction_grad_scale
from smskd_fast.backends.base import BackendStatus, LossOptions, RowInputs, RowOutputs, needs_student_grad
from smskd_fast.backends.triton import op_checks
from smskd_fast.ops.vmap_rules import batching_rule

# The signatures of smskd_loss_rows and smskd_loss_rows_topk under the Triton ops' own names.
DENSE_SCHEMA = schema.DENSE.renamed("smskd_loss_rows_triton")
TOPK_SCHEMA = schema.TOPK.renamed("smskd_loss_rows_topk_triton")  # the teacher in top-k form (backends/topk.py)
OP_NAME = DENSE_SCHEMA.qualified_name
TOPK_OP_NAME = TOPK_SCHEMA.qualified_name
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    import triton

    from smskd_fast.backends.triton import launch as triton_launch
    from smskd_fast.backends.triton import topk_launch as triton_topk_launch
    _IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # triton is optional: the other backends still work
    _IMPORT_ERROR = f"triton could not be imported: {error}"


def kernels_interpreted() -> bool:
    """Whether the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return _IMPORT_ERROR is None and triton_launch.kernels_interpreted()


def _traceable(kernel):
    """wrap_triton for compiled kernels; interpreted ones are launched as they are."""
    return kernel if kernels_interpreted() else torch.library.wrap_triton(kernel)


def _check_dtype(student: torch.Tensor) -> None:
    if student.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the triton backend takes float32, bfloat16 or float16 logits, got {student.dtype}; "
            "its kernels accumulate in float32 with float32 scalar arguments, so they cannot give "
            "float64 accuracy: use backend='reference' for float64 (or 'cpu' for CPU tensors)"
        )


def _check_grad_scale(grad_scale: Optional[torch.Tensor], student: torch.Tensor, op: str) -> None:
    """grad_scale must be None or one float32 value on the student's device (ops/schema.py GRAD_SCALE);
    the rule and the messages of the compiled ops' check (csrc/grad_scale_arg.h)."""
    if grad_scale is None:
        return
    if not (grad_scale.dim() == 0 or (grad_scale.dim() == 1 and grad_scale.numel() == 1)):
        raise ValueError(f"{op}: grad_scale must be a 0-d tensor (one value), got shape {list(grad_scale.shape)}")
    if grad_scale.dtype != torch.float32:
        raise TypeError(f"{op}: grad_scale must be {torch.float32} (the accumulation dtype of {student.dtype} "
                        f"logits), got {grad_scale.dtype}")
    if grad_scale.device != student.device:
        raise ValueError(f"{op}: grad_scale must be on the student's device {student.device}, "
                         f"got {grad_scale.device}")


def _gradient_scale(op: str, reduction: str, grad_scale: Optional[torch.Tensor], target: Optional[torch.Tensor],
                    student: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """The factor the kernels write the gradient with (reduction_grad_scale), after the compiled ops'
    checks in their order: a reduction refuses any grad_scale before its value is looked at."""
    scale = reduction_grad_scale(reduction, grad_scale, target, student, ignore_index, op)
    _check_grad_scale(grad_scale, student, op)
    return scale


def _reduced(outputs: tuple, reduction: str, scale: Optional[torch.Tensor]) -> tuple:
    """The launchers' outputs as an op returns them for reduction (ops/reduction.py, as csrc/reduction_arg.h)."""
    return outputs if reduction == "none" else reduce_per_row_outputs(outputs, scale)


def _unit_column_stride(logits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Rows may have any stride; columns must be contiguous for the kernels."""
    if logits is None or logits.stride(-1) == 1:
        return logits
    return logits.contiguous()


def _dense_rows(student, target, teacher, reference, temperature, ce_weight, kd_weight, ref_weight, weighting,
                ignore_index, compute_grad, grad_scale, reduction, wrap):
    """The body of smskd_loss_rows_triton; wrap is launch.launch_rows'."""
    _check_dtype(student)
    scale = _gradient_scale(DENSE_SCHEMA.name, reduction, grad_scale, target, student, ignore_index)
    outputs = triton_launch.launch_rows(
        _unit_column_stride(student), None if target is None else target.contiguous(),
        _unit_column_stride(teacher), _unit_column_stride(reference),
        temperature, ce_weight, kd_weight, ref_weight, weighting, ignore_index, compute_grad,
        grad_scale=scale if compute_grad else None, wrap=wrap,
    )
    return _reduced(outputs, reduction, scale)


def _topk_rows(student, target, topk_values, topk_indices, true_logit, log_sum_exp, log_sum_exp_at_temperature,
               reference, temperature, ce_weight, kd_weight, ref_weight, weighting, ignore_index, compute_grad,
               grad_scale, reduction, wrap):
    """The body of smskd_loss_rows_topk_triton; wrap is topk_launch.launch_topk_rows'."""
    _check_dtype(student)
    scale = _gradient_scale(TOPK_SCHEMA.name, reduction, grad_scale, target, student, ignore_index)
    outputs = triton_topk_launch.launch_topk_rows(
        _unit_column_stride(student), None if target is None else target.contiguous(), topk_values,
        topk_indices, true_logit, log_sum_exp, log_sum_exp_at_temperature, _unit_column_stride(reference),
        temperature, ce_weight, kd_weight, ref_weight, weighting, ignore_index, compute_grad,
        grad_scale=scale if compute_grad else None, wrap=wrap,
    )
    return _reduced(outputs, reduction, scale)


def _launched_directly(kernel):
    """The wrap of an eager call outside the op: the kernel itself, as triton_op's own eager path launches it."""
    return kernel


def _eager_dense_rows(*arguments):
    """smskd_loss_rows_triton's body for ops.call_functional_op's plain eager calls (past the dispatcher)."""
    return _dense_rows(*arguments, wrap=_launched_directly)


def _eager_topk_rows(*arguments):
    """smskd_loss_rows_topk_triton's body for ops.call_functional_op's plain eager calls."""
    return _topk_rows(*arguments, wrap=_launched_directly)


if _IMPORT_ERROR is None:

    # The schema strings come from ops/schema.py. torch 2.11's triton_op accepts and ignores
    # them (it infers from the hints below: int -> SymInt, unnamed outputs); later torch uses them.
    @torch.library.triton_op(OP_NAME, mutates_args=(), schema=DENSE_SCHEMA.schema())
    def smskd_loss_rows_triton(
        student: torch.Tensor,
        target: Optional[torch.Tensor],
        teacher: Optional[torch.Tensor],
        reference: Optional[torch.Tensor],
        temperature: float,
        ce_weight: float,
        kd_weight: float,
        ref_weight: float,
        weighting: str,
        ignore_index: int,
        compute_grad: bool,
        grad_scale: Optional[torch.Tensor] = None,
        reduction: str = "none",
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused per-row loss of SPEC.md section 2 on (N, C) rows (see csrc/ops.cpp), reduced as reduction says.
        Its arguments are checked here, for direct callers (the backend's eager calls, validated by the public
        API, run _dense_rows without the checks' host cost)."""
        op_checks.check_dense_arguments(DENSE_SCHEMA.name, student, target, teacher, reference, temperature,
                                        weighting)
        return _dense_rows(student, target, teacher, reference, temperature, ce_weight, kd_weight, ref_weight,
                           weighting, ignore_index, compute_grad, grad_scale, reduction, wrap=_traceable)

    @torch.library.triton_op(TOPK_OP_NAME, mutates_args=(), schema=TOPK_SCHEMA.schema())
    def smskd_loss_rows_topk_triton(
        student: torch.Tensor,
        target: Optional[torch.Tensor],
        topk_values: torch.Tensor,
        topk_indices: torch.Tensor,
        true_logit: torch.Tensor,
        log_sum_exp: torch.Tensor,
        log_sum_exp_at_temperature: torch.Tensor,
        reference: Optional[torch.Tensor],
        temperature: float,
        ce_weight: float,
        kd_weight: float,
        ref_weight: float,
        weighting: str,
        ignore_index: int,
        compute_grad: bool,
        grad_scale: Optional[torch.Tensor] = None,
        reduction: str = "none",
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """smskd_loss_rows_triton with the teacher in top-k form (see csrc/ops.cpp, smskd_loss_rows_topk)."""
        op_checks.check_topk_arguments(TOPK_SCHEMA.name, student, target, topk_values, topk_indices, true_logit,
                                       log_sum_exp, log_sum_exp_at_temperature, reference, temperature, weighting)
        return _topk_rows(student, target, topk_values, topk_indices, true_logit, log_sum_exp,
                          log_sum_exp_at_temperature, reference, temperature, ce_weight, kd_weight, ref_weight,
                          weighting, ignore_index, compute_grad, grad_scale, reduction, wrap=_traceable)

    def _register_fake_and_autograd() -> None:
        # The shape functions, gradient formulas and vmap rules of smskd_fast::smskd_loss_rows(_topk).
        # The fakes replace triton_op's default (running the body on fake tensors),
        # which the interpreter's kernels cannot do.
        for op, op_schema in ((smskd_loss_rows_triton, DENSE_SCHEMA), (smskd_loss_rows_topk_triton, TOPK_SCHEMA)):
            op.register_fake(op_schema.fake)
            op.register_autograd(ops.backward_of(op_schema), setup_context=ops.setup_context)
            op.register_vmap(batching_rule(op_schema))

    _register_fake_and_autograd()


def _scalar_arguments(options: LossOptions, compute_grad: bool) -> tuple:
    """The ops' (and the launchers') arguments after the tensors, in schema order."""
    return (*schema.scalar_arguments(options), bool(compute_grad))


class _OverwriteStudentRows(torch.autograd.Function):
    """Runs the kernels with the student logits as the gradient buffer (no N x C allocation)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, target, teacher, reference, teacher_topk, grad_scale,
                reduction: str, options: LossOptions):
        op = (DENSE_SCHEMA if teacher_topk is None else TOPK_SCHEMA).name
        scale = _gradient_scale(op, reduction, grad_scale, target, student, options.ignore_index)
        grad = student.detach()
        scalars = _scalar_arguments(options, compute_grad=True)
        if teacher_topk is None:
            outputs = triton_launch.launch_rows(grad, target, teacher, reference, *scalars, grad_scale=scale,
                                                grad_out=grad)
        else:
            outputs = triton_topk_launch.launch_topk_rows(
                grad, target, teacher_topk.values, teacher_topk.indices, teacher_topk.true_logit,
                teacher_topk.log_sum_exp, teacher_topk.log_sum_exp_at_temperature, reference, *scalars,
                grad_scale=scale, grad_out=grad,
            )
        # The kernels wrote over the logits: bump their version counter (grad shares it), as the compiled
        # in-place op does, so that autograd refuses, rather than silently misuses, any other saved use
        # of their old values (the caller promised there is none: LossOptions.overwrite_student_logits).
        torch.autograd.graph.increment_version(grad)
        # backward divides the caller's grad_scale (None with a reduction) out of grad_output
        # (ops.scale_gradient_in_student_once).
        ops.save_for_scaling(ctx, grad, grad_scale, target, options.ignore_index)
        per_row = _reduced(outputs[:len(schema.PER_ROW_OUTPUTS)], reduction, scale)
        ctx.mark_non_differentiable(*per_row[1:])
        return per_row

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        return ops.scale_gradient_in_student_once(ctx, grad_loss), None, None, None, None, None, None, None


def _may_overwrite(inputs: RowInputs, options: LossOptions) -> bool:
    """The in-place path: not under torch.compile, nor under vmap (its autograd.Function has no batching
    rule, whether or not the student is batched; the functional op has one, ops/vmap_rules.py)."""
    student = inputs.student
    return (
        options.overwrite_student_logits
        and needs_student_grad(student)
        and student.is_contiguous()
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


class TritonBackend:
    """Triton kernels on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"
    supports_topk = True
    reduces = True  # inside the op (ops/reduction.py), as the compiled ops do
    checks_target = True  # on the device, or on the host under the interpreter (launch.check_targets)

    def status(self) -> BackendStatus:
        if _IMPORT_ERROR is not None:
            return BackendStatus(False, _IMPORT_ERROR)
        if kernels_interpreted():
            return BackendStatus(
                True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): kernels run on CPU "
                "tensors, slowly, for tests"
            )
        if not torch.cuda.is_available():
            return BackendStatus(
                False, f"triton {triton.__version__} is installed but no CUDA device is visible "
                "(set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU tensors)"
            )
        return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")

    def supports(self, device: torch.device) -> bool:
        if device.type == "cuda":
            return True
        return device.type == "cpu" and kernels_interpreted()

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return dtype != torch.float64  # fp32 scalars in the kernels: see _check_dtype

    def rows(self, inputs: RowInputs, options: LossOptions) -> RowOutputs:
        _check_dtype(inputs.student)
        if _may_overwrite(inputs, options):
            return schema.row_outputs(_OverwriteStudentRows.apply(
                inputs.student, None if inputs.target is None else inputs.target.contiguous(),
                _unit_column_stride(inputs.teacher), _unit_column_stride(inputs.reference),
                inputs.teacher_topk, inputs.grad_scale, inputs.reduction, options,
            ))
        scalars = _scalar_arguments(options, needs_student_grad(inputs.student))
        topk = inputs.teacher_topk
        if topk is None:
            outputs = ops.call_functional_op(
                torch.ops.smskd_fast.smskd_loss_rows_triton,
                inputs.student, inputs.target, inputs.teacher, inputs.reference, *scalars, inputs.grad_scale,
                inputs.reduction, eager=_eager_dense_rows)
        else:
            outputs = ops.call_functional_op(
                torch.ops.smskd_fast.smskd_loss_rows_topk_triton,
                inputs.student, inputs.target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
                topk.log_sum_exp_at_temperature, inputs.reference, *scalars, inputs.grad_scale, inputs.reduction,
                eager=_eager_topk_rows)
        return schema.row_outputs(outputs)

