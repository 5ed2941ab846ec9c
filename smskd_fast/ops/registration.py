"""Python half of the smskd_fast::smskd_loss_rows(_topk) operators: fake kernels and autograd.

The schema (stated in smskd_fast/ops/schema.py, registered by csrc/ops.cpp) and the
device kernels are C++ (csrc/); here we add what
torch.compile needs (a fake implementation that only computes shapes) and the
autograd formula. The kernel writes the gradient of each row's loss during the
forward pass ("backward in forward"), times the op's grad_scale (the mean's 1/n),
so backward only scales it by grad_output / grad_scale, in place when the graph is
not retained: the op's grad output is then consumed by backward (the public API
never exposes it). For a mean loss with grad_output = 1 that factor is exactly 1
and backward touches no row (ops/scale_rows.py).

The backends call the functional ops through call_functional_op: in eager mode with
a student that needs its gradient it runs the op under FunctionalOpUnderAutograd,
the same formula without torch.library's per-call binding of the arguments to the
schema (see that class); traced calls go to the op itself.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from smskd_fast.ops import schema
from smskd_fast.ops.batching import vmap_batched
from smskd_fast.ops.extension import extension_loaded
from smskd_fast.ops.scale_rows import scale_rows_

OP_NAME = schema.DENSE.qualified_name
TOPK_OP_NAME = schema.TOPK.qualified_name  # the teacher in top-k form (smskd_fast/backends/topk.py)
# The same loss writing the gradient over the student logits (GPU backends).
INPLACE_OP_NAME = schema.INPLACE.qualified_name


# Positions of compute_grad and grad_scale in a functional op's arguments (schema.FUNCTIONAL_TAIL).
_COMPUTE_GRAD = -len(schema.FUNCTIONAL_TAIL) + schema.FUNCTIONAL_TAIL.index(schema.COMPUTE_GRAD)
_GRAD_SCALE = -len(schema.FUNCTIONAL_TAIL) + schema.FUNCTIONAL_TAIL.index(schema.GRAD_SCALE)
# ... and of target and ignore_index (the same in both functional ops).
_TARGET = [argument.name for argument in schema.DENSE.arguments].index("target")
_IGNORE_INDEX = -len(schema.FUNCTIONAL_TAIL) - len(schema.SCALAR_ARGUMENTS) + [
    argument.name for argument in schema.SCALAR_ARGUMENTS].index("ignore_index")


def setup_context(ctx, inputs, output) -> None:
    """Saves the op's grad output (its last), grad_scale and target, for the functional ops
    (..., compute_grad, grad_scale, reduction). With a reduction grad_scale is None: the
    gradient written is already that of the reduced loss, and backward's factor is grad_output.
    Only the loss is differentiable: the other outputs are the loss's parts and the written gradient,
    which backward returns as the student's (differentiable, it would carry this op's grad_fn)."""
    ctx.compute_grad = inputs[_COMPUTE_GRAD]
    # Only the loss output has a gradient; without this, autograd would hand
    # backward a materialised N x C zero tensor for the unused grad output.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    save_for_scaling(ctx, output[-1], inputs[_GRAD_SCALE], inputs[_TARGET], inputs[_IGNORE_INDEX])


def save_for_scaling(ctx, grad: torch.Tensor, grad_scale: Optional[torch.Tensor], target: Optional[torch.Tensor],
                     ignore_index: int) -> None:
    """What backward's scaling of the written gradient reads (row_factor): the gradient, the op's
    grad_scale, and the target with ignore_index, whose rows keep a zero gradient."""
    ctx.ignore_index = ignore_index
    ctx.save_for_backward(grad, grad_scale, target)


def _last_use_of_saved_tensors(saved: torch.Tensor) -> bool:
    """True in an eager backward that frees the graph (retain_graph=False); False when
    tracing (torch.compile) or when that cannot be known (older torch)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or type(saved) is not torch.Tensor:
        return False
    return not keep_graph()


def refuse_double_backward() -> None:
    """Called by backward before it returns a gradient that the kernels wrote in the forward pass.
    Under create_graph=True (grad mode on in backward) autograd would take that gradient for a constant,
    so a second derivative through it (a gradient penalty, MAML, Hessian-vector products) would silently
    lack the loss's own second-order term: refuse instead, with what to use. Eager only: a traced
    backward (torch.compile, a dispatch mode) runs with grad mode on while tracing its graph."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack():
        raise NotImplementedError(
            "smskd_fast: the fused backends write the loss's gradient in the forward pass, so it cannot be "
            "differentiated again: backward with create_graph=True (double backward: a gradient penalty, MAML, "
            "Hessian-vector products) needs backend='reference' (smskd_loss, kd_loss)"
        )


def backward_of(op: schema.OpSchema):
    """The autograd formula of a functional op (schema.DENSE, schema.TOPK or their Triton renamings)."""
    if op.arguments[0].name != "student" or op.arguments[-len(schema.FUNCTIONAL_TAIL):] != schema.FUNCTIONAL_TAIL:
        raise ValueError(f"{op.name} is not a functional loss op (student first, compute_grad, grad_scale and "
                         "reduction last)")

    def backward(ctx, grad_loss, *unused_grads):
        return _student_gradient(ctx, grad_loss, op.num_arguments)

    return backward


def _student_gradient(ctx, grad_loss, num_inputs: int):
    """The gradient for every op input: the student's first, None for the rest."""
    if grad_loss is None:
        return (None,) * num_inputs
    if not ctx.compute_grad:
        if not ctx.needs_input_grad[0]:
            return (None,) * num_inputs  # a teacher or reference that requires grad: constants, no gradient
        raise RuntimeError(
            "smskd_loss_rows was called with compute_grad=False, so it has no gradient; "
            "call it with compute_grad=True when the student logits require grad"
        )
    refuse_double_backward()
    row_grad, grad_scale, target = ctx.saved_tensors
    factor = row_factor(grad_loss, grad_scale, target, ctx.ignore_index)
    # When nothing reads row_grad after this backward (it is the op's own buffer),
    # scale it in place: the gradient then costs one N x C buffer instead of two,
    # and rows whose factor is 1 are not touched at all.
    # (A batched factor, from a batched grad_output, cannot scale the unbatched row_grad in place.)
    in_place = _last_use_of_saved_tensors(row_grad) and not vmap_batched(factor)
    grad_student = scale_rows_(row_grad, factor) if in_place else (row_grad * factor.unsqueeze(-1)).to(row_grad.dtype)
    return (grad_student,) + (None,) * (num_inputs - 1)


def row_factor(grad_loss: torch.Tensor, grad_scale, target: Optional[torch.Tensor] = None,
               ignore_index: int = -100) -> torch.Tensor:
    """What each saved gradient row still needs: grad_output of the row over the op's grad_scale
    (a reduced op's grad_output is 0-d and its grad_scale None: the factor of every row), and 1 on the
    rows whose target is ignore_index: their gradient is 0 whatever grad_output holds there, as
    cross_entropy's is, and the kernels wrote zeros there (grad_output itself would not do: 0 * NaN is
    NaN, and a per-sequence mean over a sequence of padding alone sends 0 / 0 to its rows). 1, not 0,
    so that a factor of ones elsewhere leaves the pass out (scale_rows_).

    Stays in grad_loss's own (fp32) dtype: the product with the gradient is formed in
    fp32 and rounded once to the gradient's dtype; rounding it to bf16 first would add
    a rounding (tests/tolerances.py, scaled_grad_rtol). A mean loss's grad_loss is
    grad_output * grad_scale, so with grad_output = 1 the quotient is exactly 1.
    """
    factor = grad_loss if grad_scale is None else grad_loss / grad_scale
    if target is not None and factor.dim() == 1:
        factor = torch.where(target != ignore_index, factor, 1.0)
    return factor


def scale_gradient_in_student_once(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
    """Backward when the kernel wrote d loss / d logits into the logits' own memory.

    The one saved buffer (saved with save_for_scaling, beside grad_scale and the target) is scaled in place
    by grad_output / grad_scale, so backward can run only once; the
    overwrite_student_logits paths of every backend share this.
    """
    if getattr(ctx, "backward_done", False):
        raise RuntimeError(
            "overwrite_student_logits=True keeps one gradient buffer and scales it in place, so backward "
            "can run only once: a second backward through the same loss is not supported; call without "
            "retain_graph or without the option"
        )
    refuse_double_backward()
    ctx.backward_done = True
    grad, grad_scale, target = ctx.saved_tensors
    return scale_rows_(grad, row_factor(grad_loss, grad_scale, target, ctx.ignore_index))


# Dispatches straight to the device kernel, past the Autograd key's Python wrapper (which
# would only see that grad mode is off and redispatch); torch.library's own wrapper uses it.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


def _forward_below_autograd(ctx, op, arguments: tuple, row_scale: Optional[torch.Tensor] = None) -> tuple:
    """op(*arguments) run below autograd, ctx set up for the registered backward (_student_gradient).
    With row_scale, the gradient output is scaled by it in place row by row, and backward reads row_scale
    as the op's grad_scale."""
    with _below_autograd():
        outputs = op(*arguments)
    saved = arguments
    if row_scale is not None:
        scale_rows_(outputs[-1], row_scale)
        saved = list(arguments)
        saved[_GRAD_SCALE] = row_scale
    setup_context(ctx, saved, outputs)
    ctx.num_inputs = len(arguments)
    return outputs


class FunctionalOpUnderAutograd(torch.autograd.Function):
    """Eager twin of the autograd registered below, for the backends' own calls.

    register_autograd's wrapper re-binds every call's arguments to the schema
    (torch._library.utils.fill_defaults rebuilds the argument list once per argument:
    ~28 us of the ~195 us a small CPU call costs, benchmarks/host_overhead.py), and it
    makes every output differentiable, so the per-row terms the API reduces build
    graph nodes for nothing. Here grad mode is off inside forward, so the op runs
    below autograd at once; only the loss is differentiable, and backward is the
    registered formula (_student_gradient). torch.compile traces the op itself.
    forward takes ctx: with a separate setup_context, Function.apply would bind the
    arguments with inspect.signature on every call (+~25 us; torch.func.grad would then
    work, which it does not through register_autograd either).
    """

    @staticmethod
    def forward(ctx, op, *arguments):
        return _forward_below_autograd(ctx, op, arguments)

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):
        return (None,) + _student_gradient(ctx, grad_loss, ctx.num_inputs)


class RowScaledOpUnderAutograd(torch.autograd.Function):
    """A functional op called with grad_scale None, its gradient output then scaled in place row by row by
    row_scale (N,): a factor per row, which the op's one grad_scale cannot carry (ops/vmap_rules.py: the
    samples' own means, or a batched grad_scale, in one call on all their rows). Backward is the registered
    formula with row_scale as grad_scale: its factor grad_output / row_scale is exactly 1 where a sample's
    loss is differentiated with grad_output 1, and touches no row there. Applied with no torch.func
    transform active (an autograd.Function under one would need a vmap rule of its own)."""

    @staticmethod
    def forward(ctx, op, row_scale, *arguments):
        return _forward_below_autograd(ctx, op, arguments, row_scale)

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):
        return (None, None) + _student_gradient(ctx, grad_loss, ctx.num_inputs)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_eager_call(arguments) -> bool:
    """Whether nothing but the op's own implementation could see this call: plain tensors (no subclass),
    no dispatch or function mode (fake tensors, functionalization, operation counters, torch.device(...),
    torch.set_default_device), no torch.func transform (vmap's batched tensors have no storage for the
    kernels: the op's vmap rule unwraps them, ops/vmap_rules.py), no JIT tracer, no profiler."""
    return (torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._are_functorch_transforms_active()
            and torch._C._get_tracing_state() is None and not torch.autograd._profiler_enabled()
            and all(type(value) in _PLAIN_TENSOR_TYPES for value in arguments if isinstance(value, torch.Tensor)))


def call_functional_op(op, *arguments, eager=None):
    """op(*arguments) for a functional loss op, every argument given (student first, schema.FUNCTIONAL_TAIL
    last), under FunctionalOpUnderAutograd when it computes the gradient of a student that autograd will ask for
    (not under a torch.func transform: there the op's registered autograd and vmap rule serve).

    eager, when given, is op's own implementation for the op's device, called in op's place there on a
    plain eager call (plain_eager_call), with the gradient or without (evaluation: no tensor argument
    requires a gradient, or grad mode is off): a Python op (torch.library.triton_op) costs ~20 us per call in
    the dispatcher's Python layers before its body runs, and its body wraps each Triton launch for
    tracing (wrap_triton, ~9 us a launch); benchmarks/triton_host_overhead.py. Kernels registered over
    op (torch.library.register_kernel) are not used on that path."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return op(*arguments)  # traced, or under vmap (an autograd.Function would need a rule of its own)
    direct = eager is not None and plain_eager_call(arguments)
    if arguments[_COMPUTE_GRAD] and arguments[0].requires_grad and torch.is_grad_enabled():
        return FunctionalOpUnderAutograd.apply(eager if direct else op, *arguments)
    if direct and not (torch.is_grad_enabled() and _any_requires_grad(arguments)):
        return eager(*arguments)  # nothing for autograd to record, as the op would record nothing
    return op(*arguments)


def _any_requires_grad(arguments) -> bool:
    return any(value.requires_grad for value in arguments if isinstance(value, torch.Tensor))


def register() -> None:
    """Adds fake and autograd implementations to the compiled operators (their vmap rule: ops/vmap_rules.py)."""
    for op in schema.COMPILED_OPS:
        torch.library.register_fake(op.qualified_name)(op.fake)
    for op in (schema.DENSE, schema.TOPK):
        torch.library.register_autograd(op.qualified_name, backward_of(op), setup_context=setup_context)


if extension_loaded():
    register()
