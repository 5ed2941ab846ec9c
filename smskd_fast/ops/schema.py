"""The fused loss operators' signatures, stated once for Python.

The three operators smskd_fast::smskd_loss_rows (teacher dense),
smskd_loss_rows_topk (teacher in top-k form) and smskd_loss_rows_inplace_
(gradient written over the student) share their scalar arguments and per-row
outputs. This module names them, with the weighting modes, and derives what
every Python layer needs from that one statement: the schema strings (the
compiled library registers the same ones, csrc/ops.cpp, and the Triton ops
reuse them under their own names), the fake kernels for torch.compile, the
scalar-argument tuple that backends pass, and the unpacking of the outputs into
RowOutputs. The C/C++ twin of the output list and the weighting codes is
kernels/smskd_schema.h; tests/test_op_schema.py checks that the two agree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

NAMESPACE = "smskd_fast"

# The per-row outputs, in the operators' output order; the functional ops add GRAD_OUTPUT.
PER_ROW_OUTPUTS: Tuple[str, ...] = ("loss", "ce", "kd", "ref", "tcp", "weight")
GRAD_OUTPUT = "grad"

# The weighting modes (SPEC.md section 1); a mode's code is its index here, the
# value of the C enum smskd_weighting and of the Triton kernels' WEIGHTING constexpr.
WEIGHTINGS: Tuple[str, ...] = ("inverse_tcp", "tcp", "constant")
WEIGHTING_CODES: Dict[str, int] = {name: code for code, name in enumerate(WEIGHTINGS)}


@dataclasses.dataclass(frozen=True)
class Argument:
    """One operator argument: its name and its type in the schema language."""

    name: str
    type: str
    default: Optional[str] = None  # in the schema language ("None"); callers may then omit it

    def __str__(self) -> str:
        return f"{self.type} {self.name}" + ("" if self.default is None else f"={self.default}")


_TENSOR_INPUTS = (Argument("student", "Tensor"), Argument("target", "Tensor?"))
_DENSE_TEACHER = (Argument("teacher", "Tensor?"), Argument("reference", "Tensor?"))
_TOPK_TEACHER = (
    Argument("topk_values", "Tensor"), Argument("topk_indices", "Tensor"), Argument("true_logit", "Tensor"),
    Argument("log_sum_exp", "Tensor"), Argument("log_sum_exp_at_temperature", "Tensor"),
    Argument("reference", "Tensor?"),
)
# The settings after the tensors, named as the fields of backends.base.LossOptions.
SCALAR_ARGUMENTS: Tuple[Argument, ...] = (
    Argument("temperature", "float"), Argument("ce_weight", "float"), Argument("kd_weight", "float"),
    Argument("ref_weight", "float"), Argument("weighting", "str"), Argument("ignore_index", "int"),
)
COMPUTE_GRAD = Argument("compute_grad", "bool")
# A 0-d tensor in the accumulation dtype on the student's device, or None (1): the
# gradient written is grad_scale * d loss_i / d student_i, so that a reduction's
# factor (the mean's 1/n) costs no pass of its own; backward divides it out of
# grad_output and has nothing left to do when the two are equal (ops/registration.py).
# With a default (as REDUCTION after it), so that callers without it keep their positional arguments.
GRAD_SCALE = Argument("grad_scale", "Tensor?", default="None")
# After grad_scale: "none" returns the per-row outputs; "sum" and "mean" return loss, ce, kd and ref
# (REDUCED_OUTPUTS) as 0-d sums over the rows, the mean's divided by the rows whose target is not
# ignore_index (at least 1), and write the gradient of that reduced loss (grad_scale must be None:
# the op computes the mean's scale itself). One dispatch then does what took ten (csrc/reduction_arg.h).
REDUCTION = Argument("reduction", "str", default='"none"')
REDUCTIONS: Tuple[str, ...] = ("none", "sum", "mean")
REDUCED_OUTPUTS: Tuple[str, ...] = ("loss", "ce", "kd", "ref")  # the first PER_ROW_OUTPUTS (csrc/op_outputs.h)

_CONVERT: Dict[str, Callable[[Any], Any]] = {"float": float, "int": int, "str": str, "bool": bool}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The per-row outputs' dtype: float64 for float64 logits, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class OpSchema:
    """One operator: its name (without namespace), arguments and output names."""

    name: str
    arguments: Tuple[Argument, ...]
    outputs: Tuple[str, ...]

    @property
    def qualified_name(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def num_arguments(self) -> int:
        return len(self.arguments)

    def schema(self) -> str:
        """The signature without the name, as torch.library.triton_op and custom_op take it."""
        arguments = ", ".join(str(argument) for argument in self.arguments)
        outputs = ", ".join(f"Tensor {name}" for name in self.outputs)
        return f"({arguments}) -> ({outputs})"

    def definition(self) -> str:
        """The full schema string, as TORCH_LIBRARY's def registers it (csrc/ops.cpp)."""
        return f"{self.name}{self.schema()}"

    def renamed(self, name: str) -> "OpSchema":
        """The same signature under another name (the Triton ops)."""
        return dataclasses.replace(self, name=name)

    def fake(self, *args, **kwargs) -> Tuple[torch.Tensor, ...]:
        """The outputs' shapes and dtypes only (torch.compile's fake kernel)."""
        bound = dict(zip((argument.name for argument in self.arguments), args), **kwargs)
        student = bound["student"]
        rows, classes = student.shape
        acc = accumulation_dtype(student.dtype)
        reduced = bound.get(REDUCTION.name) in ("sum", "mean")
        per_row = tuple(student.new_empty(() if reduced and name in REDUCED_OUTPUTS else (rows,), dtype=acc)
                        for name in PER_ROW_OUTPUTS)
        if GRAD_OUTPUT not in self.outputs:
            return per_row
        return (*per_row, student.new_empty((rows if bound[COMPUTE_GRAD.name] else 0, classes)))


# The functional ops' last arguments, in this order (ops/registration.py reads them by position).
FUNCTIONAL_TAIL: Tuple[Argument, ...] = (COMPUTE_GRAD, GRAD_SCALE, REDUCTION)
DENSE = OpSchema(
    "smskd_loss_rows", _TENSOR_INPUTS + _DENSE_TEACHER + SCALAR_ARGUMENTS + FUNCTIONAL_TAIL,
    PER_ROW_OUTPUTS + (GRAD_OUTPUT,),
)
TOPK = OpSchema(
    "smskd_loss_rows_topk", _TENSOR_INPUTS + _TOPK_TEACHER + SCALAR_ARGUMENTS + FUNCTIONAL_TAIL,
    PER_ROW_OUTPUTS + (GRAD_OUTPUT,),
)
# The student is overwritten by its gradient: Tensor(a!), and no grad output.
INPLACE = OpSchema(
    "smskd_loss_rows_inplace_",
    (Argument("student", "Tensor(a!)"),) + _TENSOR_INPUTS[1:] + _DENSE_TEACHER + SCALAR_ARGUMENTS
    + (GRAD_SCALE, REDUCTION),
    PER_ROW_OUTPUTS,
)
COMPILED_OPS: Tuple[OpSchema, ...] = (DENSE, TOPK, INPLACE)


def scalar_arguments(options: Any) -> tuple:
    """The values of SCALAR_ARGUMENTS from a LossOptions (or anything with those attributes), in schema order."""
    return tuple(_CONVERT[argument.type](getattr(options, argument.name)) for argument in SCALAR_ARGUMENTS)


RowOutputs = dataclasses.make_dataclass(
    "RowOutputs", [(name, torch.Tensor) for name in PER_ROW_OUTPUTS], frozen=True,
    namespace={"__doc__": (
        "Per-row results, one field per PER_ROW_OUTPUTS name, each of shape (N,) in the accumulation dtype\n"
        "(loss, ce, kd and ref 0-d when the op reduced them: REDUCTION).\n\n"
        "loss is differentiable with respect to the student logits; the other fields are the unweighted terms\n"
        "(ref already includes the weight w_i) and the TCP and weight of each row, all zero on ignored rows."
    )},
)
RowOutputs.__module__ = __name__


def row_outputs(outputs: Sequence[torch.Tensor]) -> "RowOutputs":
    """An operator's outputs (the per-row ones first) as RowOutputs; all but loss detached (those that carry
    autograd history: the backends' eager calls return them without)."""
    values = {name: tensor.detach() if name != "loss" and tensor.requires_grad else tensor
              for name, tensor in zip(PER_ROW_OUTPUTS, outputs)}
    return RowOutputs(**values)
