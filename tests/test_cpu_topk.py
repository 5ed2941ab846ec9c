"""The C++ CPU operator smskd_fast::smskd_loss_rows_topk against the float64 reference's top-k form.

The value and gradient cases every backend shares (k grids, block boundaries, k near C,
optional inputs, a teacher with no rest, strided inputs, wide logits) are in
tests/test_backend_conformance.py; this file keeps the CPU kernel's own: the threads'
column split, bitwise-equal strided reads, float64 gradcheck, opcheck, argument errors.
Oracles: the float64 reference backend's top-k form, torch.autograd.gradcheck,
torch.library.opcheck; tolerances from tests/tolerances.py.
"""
from __future__ import annotations

import pytest
import torch

import smskd_fast
from smskd_fast.backends.base import LossOptions
from smskd_fast.backends.registry import resolve_backend
from smskd_fast.backends.topk import TopKTeacher
from test_cpu_backend import cpu_tolerance
from topk_cases import FIELDS, make_inputs, run_reference

OP = torch.ops.smskd_fast.smskd_loss_rows_topk

pytestmark = pytest.mark.skipif(
    not smskd_fast.available_backends()["cpu"].available,
    reason=f"the C++ CPU kernel is not built: {smskd_fast.available_backends()['cpu'].reason}",
)

def run_op(student, target, topk, reference, options, compute_grad=True):
    return OP(student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
              topk.log_sum_exp_at_temperature, reference, options.temperature, options.ce_weight,
              options.kd_weight, options.ref_weight, options.weighting, options.ignore_index, compute_grad)


def test_auto_picks_the_cpu_kernel_for_top_k():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32, 10, topk=True).name == "cpu"


def test_gradcheck_through_the_public_api():
    student, target, topk, reference = make_inputs(5, 7, 3, torch.float64)

    def loss(s):
        return smskd_fast.smskd_loss(s, target, None, reference, teacher_topk=topk, backend="cpu",
                                     reduction="sum").loss

    assert torch.autograd.gradcheck(loss, (student.requires_grad_(True),))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, c, k, compute_grad", [(3, 5, 2, True), (1, 1, 1, True), (4, 33, 33, False),
                                                   (0, 8, 3, True)])
def test_opcheck(dtype, n, c, k, compute_grad):
    student, target, topk, reference = make_inputs(n, c, k, dtype)
    student.requires_grad_(compute_grad)
    options = LossOptions(temperature=3.0, ce_weight=0.5, kd_weight=0.8, ref_weight=0.6)
    args = (student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
            topk.log_sum_exp_at_temperature, reference, options.temperature, options.ce_weight, options.kd_weight,
            options.ref_weight, options.weighting, options.ignore_index, compute_grad)
    torch.library.opcheck(OP.default, args)


def test_bad_inputs_are_refused_with_the_argument_named():
    student, target, topk, reference = make_inputs(4, 6, 3, torch.float32)
    options = LossOptions()
    bad_indices = TopKTeacher(topk.values, topk.indices + 6, topk.true_logit, topk.log_sum_exp,
                              topk.log_sum_exp_at_temperature)
    with pytest.raises(ValueError, match=r"topk_indices must be in \[0, 6\)"):
        run_op(student, target, bad_indices, reference, options)
    short = TopKTeacher(topk.values, topk.indices, topk.true_logit[:3], topk.log_sum_exp,
                        topk.log_sum_exp_at_temperature)
    with pytest.raises(ValueError, match="true_logit must have shape"):
        run_op(student, target, short, reference, options)
    with pytest.raises(ValueError, match="weighting must be"):
        run_op(student, target, topk, reference, LossOptions(weighting="square"))


def assert_matches_reference(student, target, topk, reference, options, dtype):
    expected, expected_grad = run_reference(student, target, topk, reference, options)
    *values, grad = run_op(student, target, topk, reference, options)
    value_tol, grad_tol = cpu_tolerance(dtype)
    for name, value in zip(FIELDS, values):
        torch.testing.assert_close(value.double(), getattr(expected, name).double(), **value_tol, msg=name)
    torch.testing.assert_close(grad.double(), expected_grad, **grad_tol)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_split_among_threads_by_columns_agree_with_whole_rows(threads):
    """The column-split path (fewer rows than threads) against the reference, whatever the thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        options = LossOptions(temperature=4.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.5)
        student, target, topk, reference = make_inputs(1, 3 * 2048 + 5, 20, torch.float64, seed=threads)
        assert_matches_reference(student, target, topk, reference, options, torch.float64)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs_give_the_contiguous_results_bitwise(dtype):
    """Strided student and reference columns (read in place), and strided top-k tensors."""
    options = LossOptions(temperature=2.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.5)
    student, target, topk, reference = make_inputs(6, 1500, 12, dtype, seed=3, temperature=2.0)
    strided = [x.t().contiguous().t() for x in (student, reference)]  # column stride N
    assert not strided[0].is_contiguous() and strided[0].stride(1) == 6
    columns = torch.zeros(6, 3000, dtype=dtype)
    columns[:, ::2] = student  # column stride 2
    topk_strided = topk.map_tensors(lambda t: torch.stack([t, t], dim=-1)[..., 1])
    assert all(not t.is_contiguous() for t in topk_strided.tensors())
    expected = run_op(student, target, topk, reference, options)
    for s, r, t in ((strided[0], strided[1], topk), (columns[:, ::2], reference, topk_strided)):
        for got, want in zip(run_op(s, target, t, r, options), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same kernel on the same values


def test_the_op_refuses_repeated_indices_naming_the_row():
    student, target, topk, reference = make_inputs(4, 6, 3, torch.float32)
    indices = topk.indices.clone()
    indices[3, 2] = indices[3, 1]
    repeated = TopKTeacher(topk.values, indices, topk.true_logit, topk.log_sum_exp, topk.log_sum_exp_at_temperature)
    with pytest.raises(ValueError, match="topk_indices must be distinct within a row, row 3 repeats class"):
        run_op(student, target, repeated, reference, LossOptions())
    with pytest.raises(TypeError, match="topk_values must be a floating tensor"):
        run_op(student, target, TopKTeacher(topk.values.long(), *topk.tensors()[1:]), reference,
               LossOptions())
