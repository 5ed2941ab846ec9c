"""Python half of the smskd_fast::smskd_loss_rows(_topk) operators: fake kernels and autograd.

The schema and the device kernels are C++ (csrc/); here we add what
torch.compile needs (a fake implementation that only computes shapes) and the
autograd formula. The kernel writes the gradient of each row's loss during the
forward pass ("backward in forward"), so backward only scales it by grad_output,
in place when the graph is not retained: the op's grad output is then consumed by
backward (the public API never exposes it).
"""
from __future__ import annotations

import torch

from smskd_fast.ops.extension import extension_loaded

OP_NAME = "smskd_fast::smskd_loss_rows"
TOPK_OP_NAME = "smskd_fast::smskd_loss_rows_topk"  # the teacher in top-k form (smskd_fast/backends/topk.py)
TOPK_OP_ARGS = 15
# The same loss writing the gradient over the student logits (GPU backends).
INPLACE_OP_NAME = "smskd_fast::smskd_loss_rows_inplace_"


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_smskd_loss_rows(
    student, target, teacher, reference, temperature, ce_weight, kd_weight,
    ref_weight, weighting, ignore_index, compute_grad,
):
    n, c = student.shape
    acc = _accumulation_dtype(student.dtype)
    per_row = [student.new_empty((n,), dtype=acc) for _ in range(6)]
    grad = student.new_empty((n if compute_grad else 0, c))
    return (*per_row, grad)


def _fake_smskd_loss_rows_topk(
    student, target, topk_values, topk_indices, true_logit, log_sum_exp, log_sum_exp_at_temperature, reference,
    temperature, ce_weight, kd_weight, ref_weight, weighting, ignore_index, compute_grad,
):
    return _fake_smskd_loss_rows(student, target, None, reference, temperature, ce_weight, kd_weight, ref_weight,
                                 weighting, ignore_index, compute_grad)


def _fake_smskd_loss_rows_inplace_(
    student, target, teacher, reference, temperature, ce_weight, kd_weight,
    ref_weight, weighting, ignore_index,
):
    n = student.shape[0]
    acc = _accumulation_dtype(student.dtype)
    return tuple(student.new_empty((n,), dtype=acc) for _ in range(6))


def _setup_context(ctx, inputs, output) -> None:
    compute_grad = inputs[-1]
    ctx.compute_grad = compute_grad
    # Only the loss output has a gradient; without this, autograd would hand
    # backward a materialised N x C zero tensor for the unused grad output.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[-1])


def _last_use_of_saved_tensors(saved: torch.Tensor) -> bool:
    """True in an eager backward that frees the graph (retain_graph=False); False when
    tracing (torch.compile) or when that cannot be known (older torch)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or type(saved) is not torch.Tensor:
        return False
    return not keep_graph()


def _backward(ctx, grad_loss, *unused_grads):
    return _student_gradient(ctx, grad_loss, 11)


def _backward_topk(ctx, grad_loss, *unused_grads):
    return _student_gradient(ctx, grad_loss, TOPK_OP_ARGS)


def _student_gradient(ctx, grad_loss, num_inputs: int):
    """The gradient for every op input: the student's first, None for the rest."""
    if grad_loss is None:
        return (None,) * num_inputs
    if not ctx.compute_grad:
        raise RuntimeError(
            "smskd_loss_rows was called with compute_grad=False, so it has no gradient; "
            "call it with compute_grad=True when the student logits require grad"
        )
    (row_grad,) = ctx.saved_tensors
    # grad_loss stays in its own (fp32) dtype: the product is formed in fp32 and rounded
    # once to the gradient's dtype; rounding grad_loss to bf16 first would add a third
    # rounding (tests/tolerances.py, scaled_grad_rtol).
    scale = grad_loss.unsqueeze(-1)
    # When nothing reads row_grad after this backward (it is the op's own buffer),
    # scale it in place: the gradient then costs one N x C buffer instead of two.
    in_place = _last_use_of_saved_tensors(row_grad)
    grad_student = row_grad.mul_(scale) if in_place else (row_grad * scale).to(row_grad.dtype)
    return (grad_student,) + (None,) * (num_inputs - 1)


def scale_gradient_in_student_once(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
    """Backward when the kernel wrote d loss / d logits into the logits' own memory.

    The one saved buffer is scaled in place by grad_output, so backward can run only
    once; the overwrite_student_logits paths of every backend share this.
    """
    if getattr(ctx, "backward_done", False):
        raise RuntimeError(
            "overwrite_student_logits=True keeps one gradient buffer and scales it in place, so backward "
            "can run only once: a second backward through the same loss is not supported; call without "
            "retain_graph or without the option"
        )
    ctx.backward_done = True
    (grad,) = ctx.saved_tensors
    return grad.mul_(grad_loss.unsqueeze(-1))  # in grad_loss's dtype, one rounding (as _student_gradient)


def register() -> None:
    """Adds fake and autograd implementations to the compiled operator."""
    torch.library.register_fake(OP_NAME)(_fake_smskd_loss_rows)
    torch.library.register_fake(INPLACE_OP_NAME)(_fake_smskd_loss_rows_inplace_)
    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)
    torch.library.register_fake(TOPK_OP_NAME)(_fake_smskd_loss_rows_topk)
    torch.library.register_autograd(TOPK_OP_NAME, _backward_topk, setup_context=_setup_context)


if extension_loaded():
    register()
