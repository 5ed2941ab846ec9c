"""torch.func.vmap of the functional loss ops: B calls on (N, C) rows become one call on (B*N, C) rows.

Without a rule, vmap runs an op once per sample (its fallback, with a warning about the performance
drop: 1.7-3.8x the time of a hand-written loop on the CPU, benchmarks/vmap_batching.py). The loss is
row-wise, so the batch only adds rows: the rule moves each batched row input's batch
dimension first, broadcasts the unbatched ones to the batch, calls the op once with reduction "none"
and gives back the per-row outputs as (B, N) and the gradient as (B, N, C). A "sum" or "mean" is then
taken per sample, as the op takes it over its rows (csrc/reduction_arg.h, ops/reduction.py), so
grad(vmap(op)) equals grad(map(op)).

Broadcasting an unbatched input copies it to every sample's rows (the kernels take one row stride):
a teacher shared by the samples, when an ensemble of students learns from it, is read B times from
memory instead of once per sample from cache. Where that copy is more than SHARED_BYTES_PER_SAMPLE
(measured on the CPU: benchmarks/vmap_batching.py), the rule calls the op sample by sample instead,
on unbound slices (one stack in backward). So it does for arguments a sample's call would refuse
(shapes that do not line up, a grad_scale of another dtype, an unknown reduction) and when the one call
raises (a target out of range, on the CPU; on CUDA the kernels assert on the device instead): the op's
own error, with the sample's shapes and positions, then reaches the caller. An empty batch is always one
call (of no rows). The op's grad_scale is one value per call, so a per-sample factor (a batched grad_scale, or a
"mean" whose samples count different valid rows) scales the returned gradient after the call, in place
(one pass over the rows, which the op would have folded into its kernel), and backward divides it out
of grad_output as the op's own grad_scale: loss.backward() of per-sample means then touches no row.
"""
from __future__ import annotations

import ast
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch._functorch.pyfunctorch import temporarily_pop_interpreter_stack

from smskd_fast.ops import registration, schema
from smskd_fast.ops.extension import extension_loaded
from smskd_fast.ops.reduction import (as_class_indices, mean_reduction_scale, reduce_per_row_outputs,
                                      reduction_grad_scale)

__all__ = ["batching_rule", "SHARED_BYTES_PER_SAMPLE"]

# Row inputs that are (N, C) or (N, K) a sample (the others are (N,)), and those of the student's shape.
_MATRIX_INPUTS = frozenset({"student", "teacher", "reference", "topk_values", "topk_indices"})
_SHAPED_AS_STUDENT = frozenset({"teacher", "reference"})
# Above this many bytes of unbatched inputs per sample, the rule calls the op sample by sample. Measured on
# the CPU (benchmarks/results/vmap_batching_2026-12-07, fwd+bwd of per-sample means, shared teacher and
# reference, the two paths forced, as time ratios to a hand-written loop): up to 500 KB a sample one call
# took 0.20-1.29x, per-sample calls 1.32-1.68x; at 1-2 MB the result was mixed; from 4 MB one call took
# 1.42-2.36x, per-sample calls 1.13-1.47x (they read the shared rows from cache, one call copies them B
# times). Unmeasured on a GPU.
SHARED_BYTES_PER_SAMPLE = 512 * 1024


def _python_default(argument: schema.Argument) -> Any:
    """An argument's default as a Python value ("None" -> None, '"none"' -> "none")."""
    return None if argument.default == "None" else ast.literal_eval(argument.default)


def _bound(op_schema: schema.OpSchema, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Every argument of a call by name: the dispatcher may leave trailing defaults out of args."""
    values = dict(zip((argument.name for argument in op_schema.arguments), args))
    for argument in op_schema.arguments[len(args):]:
        values[argument.name] = kwargs[argument.name] if argument.name in kwargs else _python_default(argument)
    return values


def _batch_first(tensor: torch.Tensor, dim: Optional[int], batch_size: int) -> torch.Tensor:
    """tensor with its batch dimension first; an unbatched one broadcast to the batch."""
    if dim is None:
        return tensor.expand(batch_size, *tensor.shape)
    return tensor.movedim(dim, 0)


def _row_inputs(op_schema: schema.OpSchema, bound: Dict[str, Any]) -> Iterator[str]:
    """Names of the call's row tensors, in schema order: every tensor argument given but grad_scale."""
    return (argument.name for argument in op_schema.arguments
            if isinstance(bound[argument.name], torch.Tensor) and argument.name != schema.GRAD_SCALE.name)


def _shared_bytes(op_schema: schema.OpSchema, in_dims: Dict[str, Optional[int]], bound: Dict[str, Any]) -> int:
    """Bytes of the unbatched row inputs that one call on B*N rows would copy to each sample's rows."""
    return sum(bound[name].numel() * bound[name].element_size()
               for name in _row_inputs(op_schema, bound) if in_dims.get(name) is None)


def _per_sample_shape(tensor: torch.Tensor, dim: Optional[int]) -> Tuple[int, ...]:
    """tensor's shape without its batch dimension."""
    return tuple(size for axis, size in enumerate(tensor.shape) if dim is None or axis != dim % tensor.dim())


def _rows_line_up(op_schema: schema.OpSchema, in_dims: Dict[str, Optional[int]], bound: Dict[str, Any]) -> bool:
    """Whether every sample's row inputs have the op's shapes: an (N, C) student, teacher and reference of
    its shape, (N, K) top-k rows, (N,) per-row values; flattened, a mismatch could pass unnoticed (N = 1)
    or be refused with the batch's sizes in the message."""
    student = _per_sample_shape(bound["student"], in_dims.get("student"))
    if len(student) != 2:
        return False
    for name in _row_inputs(op_schema, bound):
        shape = _per_sample_shape(bound[name], in_dims.get(name))
        if len(shape) != (2 if name in _MATRIX_INPUTS else 1) or shape[0] != student[0]:
            return False
        if name in _SHAPED_AS_STUDENT and shape != student:
            return False
    return True


def _grad_scale_per_sample_is_valid(in_dims: Dict[str, Optional[int]], bound: Dict[str, Any],
                                    batch_size: int) -> bool:
    """A batched grad_scale the op would take from each sample: 0-d (or one element) in the accumulation dtype
    on the student's device (flattened, it never reaches the op's check)."""
    grad_scale = bound[schema.GRAD_SCALE.name]
    if grad_scale is None or in_dims.get(schema.GRAD_SCALE.name) is None:
        return True
    student = bound["student"]
    return (_per_sample_shape(grad_scale, in_dims[schema.GRAD_SCALE.name]) in ((), (1,))
            and grad_scale.device == student.device and grad_scale.dtype == schema.accumulation_dtype(student.dtype))


def _flattens(op_schema: schema.OpSchema, in_dims: Dict[str, Optional[int]], bound: Dict[str, Any],
              batch_size: int) -> bool:
    """Whether one call on B*N rows computes this batch, and at less cost than B calls: arguments the op
    takes from every sample (it refuses the others with its own message, sample by sample) and unbatched
    inputs of at most SHARED_BYTES_PER_SAMPLE."""
    reduction = bound[schema.REDUCTION.name]
    return (reduction in schema.REDUCTIONS
            and (reduction == "none" or bound[schema.GRAD_SCALE.name] is None)
            and _rows_line_up(op_schema, in_dims, bound)
            and _grad_scale_per_sample_is_valid(in_dims, bound, batch_size)
            and _shared_bytes(op_schema, in_dims, bound) <= SHARED_BYTES_PER_SAMPLE)


def _call_with_row_scale(op: Callable, arguments: List[Any], compute_grad: bool,
                         row_scale: Optional[torch.Tensor]) -> tuple:
    """op(*arguments) (grad_scale None when row_scale is given), its gradient output scaled row by row by
    row_scale: in place, the registered backward dividing it out again (RowScaledOpUnderAutograd, applied
    with this vmap level popped: its tensors are unwrapped already). Out of place under an outer torch.func
    transform (vmap in vmap), which that autograd.Function cannot run under, and under a Python dispatch
    mode (a tracer, a counter), where torch 2.11 fails an internal TLS assert once the level is popped."""
    if row_scale is None or not compute_grad:
        return op(*arguments)
    if not torch._C._len_torch_dispatch_stack():
        with temporarily_pop_interpreter_stack():
            if not torch._C._are_functorch_transforms_active():
                return registration.RowScaledOpUnderAutograd.apply(op, row_scale, *arguments)
    *outputs, grad = op(*arguments)
    return (*outputs, (grad * row_scale.unsqueeze(-1)).to(grad.dtype))


def _one_call(op: Callable, op_schema: schema.OpSchema, batch_size: int, in_dims: Dict[str, Optional[int]],
              bound: Dict[str, Any]) -> Optional[Tuple[tuple, tuple]]:
    """The batch as one call of op on B*N rows, and its outputs with their batch dimensions; None when the op
    refused that call (its arguments' values: the caller then asks each sample's call for the message)."""
    if batch_size == 0:  # not filtered by _flattens: the op's rules for these two, in its words
        reduction_grad_scale(bound[schema.REDUCTION.name], bound[schema.GRAD_SCALE.name], None, bound["student"],
                             bound["ignore_index"], op_schema.name)
    shared_target = bound["target"]  # read when it is unbatched: one mean scale for every sample
    bound = dict(bound)
    student = _batch_first(bound["student"], in_dims.get("student"), batch_size)
    rows, classes = student.shape[1:]
    for name in _row_inputs(op_schema, bound):
        value = _batch_first(bound[name], in_dims.get(name), batch_size)
        bound[name] = value.reshape(batch_size * rows, *value.shape[2:])
    reduction = bound[schema.REDUCTION.name]
    grad_scale = bound[schema.GRAD_SCALE.name]
    sample_scale = None  # one factor per sample, applied to the returned gradient
    if reduction == "mean" and in_dims.get("target") is not None:
        sample_scale = mean_reduction_scale(
            as_class_indices(bound["target"]).view(batch_size, rows) != bound["ignore_index"], student)
    elif reduction == "mean":  # one target (or none) for every sample: one 1/n, folded in by the op
        grad_scale = mean_reduction_scale(
            rows if shared_target is None else as_class_indices(shared_target) != bound["ignore_index"], student)
    elif in_dims.get(schema.GRAD_SCALE.name) is not None:
        sample_scale = _batch_first(grad_scale, in_dims[schema.GRAD_SCALE.name], batch_size).reshape(batch_size)
        grad_scale = None
    bound[schema.GRAD_SCALE.name] = grad_scale
    bound[schema.REDUCTION.name] = "none"
    row_scale = None if sample_scale is None else sample_scale.repeat_interleave(rows)
    if row_scale is not None and bound["target"] is not None:  # ignored rows stay 0, as the op leaves them
        row_scale = torch.where(as_class_indices(bound["target"]) != bound["ignore_index"], row_scale, 1.0)
    try:
        outputs = list(_call_with_row_scale(op, [bound[argument.name] for argument in op_schema.arguments],
                                            bound[schema.COMPUTE_GRAD.name], row_scale))
    except torch.OutOfMemoryError:
        raise  # B calls would need more memory, not less (B gradients, then their stack)
    except (RuntimeError, ValueError, TypeError, IndexError):
        if batch_size == 0:
            raise  # no sample to ask instead
        return None  # e.g. a target out of range: a sample's own call names its row
    outputs[:-1] = [output.view(batch_size, rows) for output in outputs[:-1]]
    compute_grad = bound[schema.COMPUTE_GRAD.name]
    outputs[-1] = outputs[-1].view(batch_size, rows if compute_grad else 0, classes)  # without: (0, C) each
    if reduction != "none":
        outputs = reduce_per_row_outputs(outputs, sample_scale if sample_scale is not None else grad_scale)
    return tuple(outputs), (0,) * len(outputs)


def _sample_by_sample(op: Callable, op_schema: schema.OpSchema, batch_size: int,
                      in_dims: Dict[str, Optional[int]], bound: Dict[str, Any]) -> Tuple[tuple, tuple]:
    """The batch as B calls of op, as vmap's fallback runs it, its outputs stacked."""
    samples = {argument.name: bound[argument.name].unbind(in_dims[argument.name])
               for argument in op_schema.arguments if in_dims.get(argument.name) is not None}
    calls = [op(*(samples[argument.name][sample] if argument.name in samples else bound[argument.name]
                  for argument in op_schema.arguments))
             for sample in range(batch_size)]
    outputs = tuple(torch.stack(column) for column in zip(*calls))
    return outputs, (0,) * len(outputs)


def batching_rule(op_schema: schema.OpSchema) -> Callable:
    """The vmap rule (torch.library.register_vmap) of a functional op with this schema: schema.DENSE,
    schema.TOPK or their Triton renamings; the op is looked up by name when the rule runs."""
    names = [argument.name for argument in op_schema.arguments]

    def rule(info, in_dims: Tuple[Optional[int], ...], *args, **kwargs) -> Tuple[tuple, tuple]:
        op = getattr(torch.ops.smskd_fast, op_schema.name)
        bound = _bound(op_schema, args, kwargs)
        dims = dict(zip(names, in_dims))
        if info.batch_size == 0 or _flattens(op_schema, dims, bound, info.batch_size):
            batched = _one_call(op, op_schema, info.batch_size, dims, bound)
            if batched is not None:
                return batched
        return _sample_by_sample(op, op_schema, info.batch_size, dims, bound)

    return rule


def register() -> None:
    """Adds the rule to the compiled functional ops (the Triton ops add theirs: backends/triton/backend.py)."""
    for op in (schema.DENSE, schema.TOPK):
        torch.library.register_vmap(op.qualified_name, batching_rule(op))


if extension_loaded():
    register()
