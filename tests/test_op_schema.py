"""The operators' one signature (smskd_fast/ops/schema.py) against every layer that uses it.

- The schemas the compiled library registers (csrc/ops.cpp) and the Triton ops'
  equal the strings that schema.py derives, for every variant.
- kernels/smskd_schema.h, the C/C++ list, names the same per-row outputs and
  weighting codes as schema.py.
- Every weighting mode gives the reference backend's weight and loss through the
  C++ operator, and an unknown mode is refused with the full list of modes.
- The derived pieces (fakes, RowOutputs, the scalar tuple) follow the lists.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import torch

import smskd_fast
from smskd_fast.backends.base import LossOptions
from smskd_fast.ops import schema
from smskd_fast.ops.extension import extension_loaded

HEADER = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "smskd_schema.h"

needs_extension = pytest.mark.skipif(not extension_loaded(), reason="smskd_fast._C is not built")


def _registered_schema(name: str) -> torch.FunctionSchema:
    return getattr(torch.ops.smskd_fast, name).default._schema


@needs_extension
@pytest.mark.parametrize("op", schema.COMPILED_OPS, ids=lambda op: op.name)
def test_compiled_library_registers_the_schema_py_signature(op):
    assert str(_registered_schema(op.name)) == f"{schema.NAMESPACE}::{op.definition()}"


def _callers_view(registered: torch.FunctionSchema) -> tuple[list[tuple[str, str]], int]:
    """What a caller sees of a schema: argument names and types (SymInt as int), and the number of outputs."""
    arguments = [(a.name, str(a.type).replace("SymInt", "int")) for a in registered.arguments]
    return arguments, len(registered.returns)


def test_triton_ops_have_the_compiled_ops_signatures_under_their_names():
    backend = pytest.importorskip("smskd_fast.backends.triton.backend")
    if backend._IMPORT_ERROR is not None:
        pytest.skip(backend._IMPORT_ERROR)
    for op, compiled in ((backend.DENSE_SCHEMA, schema.DENSE), (backend.TOPK_SCHEMA, schema.TOPK)):
        assert op.schema() == compiled.schema()
        expected = f"{schema.NAMESPACE}::{op.definition()}"
        if torch.__version__ >= "2.14":  # verified: torch 2.14 registers triton_op's schema= as given
            assert str(_registered_schema(op.name)) == expected
        else:  # verified on 2.11: triton_op ignores schema= and infers int -> SymInt, unnamed outputs
            assert _callers_view(_registered_schema(op.name)) == _callers_view(torch._C.parse_schema(expected))


def _header_macro(name: str) -> str:
    """The body of a #define in smskd_schema.h, comments and line continuations removed."""
    text = re.sub(r"/\*.*?\*/", " ", HEADER.read_text(), flags=re.S).replace("\\\n", " ")
    match = re.search(rf"#define {name}\(X\)(.*)", text)
    assert match, f"{name} not found in {HEADER}"
    return match.group(1)


def test_header_lists_the_per_row_outputs_of_schema_py():
    names = tuple(re.findall(r"X\((\w+)\)", _header_macro("SMSKD_PER_ROW_OUTPUTS")))
    assert names == schema.PER_ROW_OUTPUTS


def test_header_gives_each_weighting_the_code_of_schema_py():
    entries = re.findall(r"X\((\w+),\s*(\w+),\s*(\d+)\)", _header_macro("SMSKD_WEIGHTINGS"))
    assert {name: int(code) for _, name, code in entries} == schema.WEIGHTING_CODES
    assert all(suffix == name.upper() for suffix, name, _ in entries)
    assert [name for _, name, _ in entries] == list(schema.WEIGHTINGS)  # the C names array is indexed by code


@needs_extension
@pytest.mark.parametrize("weighting", schema.WEIGHTINGS)
def test_cpu_op_weights_rows_as_the_reference_for_every_mode(weighting):
    generator = torch.Generator().manual_seed(7)
    student, teacher, reference = (torch.randn(9, 13, dtype=torch.float64, generator=generator) for _ in range(3))
    target = torch.randint(0, 13, (9,), generator=generator)
    target[4] = -100
    results = {
        backend: smskd_fast.smskd_loss(student, target, teacher, reference, temperature=2.0, weighting=weighting,
                                       reduction="none", backend=backend)
        for backend in ("cpu", "reference")
    }
    for field in ("weight", "tcp", "ref", "loss"):
        torch.testing.assert_close(getattr(results["cpu"], field), getattr(results["reference"], field),
                                   rtol=1e-12, atol=1e-12)
    # Each mode's own formula (SPEC.md section 2), so that a swapped code cannot pass in both backends.
    valid = target != -100
    tcp = torch.softmax(teacher, dim=-1).gather(1, target.clamp(min=0)[:, None])[:, 0]
    expected = {"inverse_tcp": 1 - tcp, "tcp": tcp, "constant": torch.ones_like(tcp)}[weighting]
    torch.testing.assert_close(results["cpu"].weight, torch.where(valid, expected, 0.0), rtol=1e-12, atol=1e-12)


@needs_extension
def test_cpu_op_refuses_an_unknown_weighting_listing_every_mode():
    student = torch.randn(2, 3)
    with pytest.raises(ValueError, match="weighting must be one of") as error:
        torch.ops.smskd_fast.smskd_loss_rows(student, None, None, None, 1.0, 1.0, 1.0, 1.0, "uniform", -100, False)
    for name in schema.WEIGHTINGS:
        assert f"'{name}'" in str(error.value)


@pytest.mark.parametrize("reduction", schema.REDUCTIONS)
@pytest.mark.parametrize("op", schema.COMPILED_OPS, ids=lambda op: op.name)
def test_fakes_give_one_output_per_schema_output(op, reduction):
    student = torch.empty(5, 7, dtype=torch.bfloat16, device="meta")
    values = {"student": student, "compute_grad": True, "reduction": reduction}
    outputs = op.fake(*(values.get(argument.name) for argument in op.arguments))
    assert len(outputs) == len(op.outputs)
    for name, tensor in zip(op.outputs, outputs):
        if name == schema.GRAD_OUTPUT:
            expected = ((5, 7), torch.bfloat16)
        else:
            expected = ((), torch.float32) if reduction != "none" and name in schema.REDUCED_OUTPUTS \
                else ((5,), torch.float32)
        assert (tuple(tensor.shape), tensor.dtype) == expected, name


def test_reduced_outputs_are_the_first_per_row_outputs():
    """csrc/op_outputs.h reduces the first kNumReducedOutputs outputs, as schema.REDUCED_OUTPUTS names them."""
    assert schema.PER_ROW_OUTPUTS[:len(schema.REDUCED_OUTPUTS)] == schema.REDUCED_OUTPUTS
    header = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "op_outputs.h").read_text()
    assert f"constexpr int64_t kNumReducedOutputs = {len(schema.REDUCED_OUTPUTS)};" in header


@needs_extension
@pytest.mark.parametrize("reduction", schema.REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fake_matches_the_cpu_op(reduction, dtype):
    """The fake kernel's shapes and dtypes are the compiled op's, for every reduction."""
    student, teacher, reference = (torch.randn(5, 7).to(dtype) for _ in range(3))
    target = torch.tensor([0, 3, -100, 6, 2])
    arguments = (student, target, teacher, reference, 2.0, 1.0, 1.0, 1.0, "inverse_tcp", -100, True, None, reduction)
    real = torch.ops.smskd_fast.smskd_loss_rows(*arguments)
    fake = schema.DENSE.fake(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in arguments))
    assert [(tuple(t.shape), t.dtype) for t in fake] == [(tuple(t.shape), t.dtype) for t in real]


def test_row_outputs_and_scalar_arguments_follow_the_lists():
    assert tuple(field.name for field in dataclasses.fields(schema.RowOutputs)) == schema.PER_ROW_OUTPUTS
    option_fields = {field.name for field in dataclasses.fields(LossOptions)}
    assert {argument.name for argument in schema.SCALAR_ARGUMENTS} <= option_fields
    options = LossOptions(temperature=3, ce_weight=0.5, weighting="tcp", ignore_index=-1)
    assert schema.scalar_arguments(options) == (3.0, 0.5, 1.0, 1.0, "tcp", -1)
    assert [type(value) for value in schema.scalar_arguments(options)] == [float, float, float, float, str, int]
