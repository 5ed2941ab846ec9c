"""Python half of the smskd_fast::smskd_loss_rows(_topk) operators: fake kernels and autograd.

The schema (stated in smskd_fast/ops/schema.py, registered by csrc/ops.cpp) and the
device kernels are C++ (csrc/); here we add what
torch.compile needs (a fake implementation that only computes shapes) and the
autograd formula. The kernel writes the gradient of each row's loss during the
forward pass ("backward in forward"), so backward only scales it by grad_output,
in place when the graph is not retained: the op's grad output is then consumed by
backward (the public API never exposes it).
"""
from __future__ import annotations

import torch

from smskd_fast.ops import schema
from smskd_fast.ops.extension import extension_loaded

OP_NAME = schema.DENSE.qualified_name
TOPK_OP_NAME = schema.TOPK.qualified_name  # the teacher in top-k form (smskd_fast/backends/topk.py)
# The same loss writing the gradient over the student logits (GPU backends).
INPLACE_OP_NAME = schema.INPLACE.qualified_name


def setup_context(ctx, inputs, output) -> None:
    """Saves the op's grad output (its last), for the functional ops whose last argument is compute_grad."""
    ctx.compute_grad = inputs[-1]
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


def backward_of(op: schema.OpSchema):
    """The autograd formula of a functional op (schema.DENSE, schema.TOPK or their Triton renamings)."""
    if op.arguments[0].name != "student" or op.arguments[-1] != schema.COMPUTE_GRAD:
        raise ValueError(f"{op.name} is not a functional loss op (student first, compute_grad last)")

    def backward(ctx, grad_loss, *unused_grads):
        return _student_gradient(ctx, grad_loss, op.num_arguments)

    return backward


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
    for op in schema.COMPILED_OPS:
        torch.library.register_fake(op.qualified_name)(op.fake)
    for op in (schema.DENSE, schema.TOPK):
        torch.library.register_autograd(op.qualified_name, backward_of(op), setup_context=setup_context)


if extension_loaded():
    register()
