"""The C++ CPU operator smskd_fast::smskd_loss_rows_topk against the float64 reference's top-k form.

Oracles: the pure-PyTorch reference backend (topk.py's coarsened KL, its gradient by
autograd) run in float64 on the same, exactly upcast, input values;
torch.autograd.gradcheck; torch.library.opcheck. Tolerances as in test_cpu_backend.py:
the kernel accumulates in double (float64 inputs) or float (others), so float64 agrees
to summation order (1e-10) and the others to a few fp32 ulps of values O(10); the
gradient is rounded once to bfloat16 (rtol 2^-8).
"""
from __future__ import annotations

import pytest
import torch

import smskd_fast
from smskd_fast.backends.base import LossOptions
from smskd_fast.backends.registry import resolve_backend
from smskd_fast.backends.topk import TopKTeacher
from topk_cases import FIELDS, make_inputs, run_reference

OP = torch.ops.smskd_fast.smskd_loss_rows_topk

pytestmark = pytest.mark.skipif(
    not smskd_fast.available_backends()["cpu"].available,
    reason=f"the C++ CPU kernel is not built: {smskd_fast.available_backends()['cpu'].reason}",
)

VALUE_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=5e-5, atol=5e-5),
             torch.bfloat16: dict(rtol=5e-5, atol=5e-5)}
GRAD_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=2e-6),
            torch.bfloat16: dict(rtol=2**-8, atol=1e-5)}


def run_op(student, target, topk, reference, options, compute_grad=True):
    return OP(student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
              topk.log_sum_exp_at_temperature, reference, options.temperature, options.ce_weight,
              options.kd_weight, options.ref_weight, options.weighting, options.ignore_index, compute_grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 3, 17])
@pytest.mark.parametrize("weighting", ["inverse_tcp", "tcp", "constant"])
def test_matches_the_float64_reference(dtype, k, weighting):
    options = LossOptions(temperature=4.0, ce_weight=0.3, kd_weight=0.9, ref_weight=0.7, weighting=weighting)
    student, target, topk, reference = make_inputs(9, 17, k, dtype)
    expected, expected_grad = run_reference(student, target, topk, reference, options)
    *values, grad = run_op(student, target, topk, reference, options)
    for name, value in zip(FIELDS, values):
        torch.testing.assert_close(value.double(), getattr(expected, name).double(), **VALUE_TOL[dtype], msg=name)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), expected_grad, **GRAD_TOL[dtype])
    assert torch.all(grad[1] == 0) and all(float(v[1]) == 0 for v in values)  # the ignored row


@pytest.mark.parametrize("with_target, with_reference", [(False, False), (False, True), (True, False)])
def test_optional_inputs_match_the_reference(with_target, with_reference):
    options = LossOptions(temperature=2.0, ce_weight=1.0, kd_weight=1.0, ref_weight=0.5,
                          weighting="constant" if not with_target else "inverse_tcp")
    student, target, topk, reference = make_inputs(6, 11, 4, torch.float64, temperature=2.0,
                                                   with_target=with_target, with_reference=with_reference)
    expected, expected_grad = run_reference(student, target, topk, reference, options)
    *values, grad = run_op(student, target, topk, reference, options)
    for name, value in zip(FIELDS, values):
        torch.testing.assert_close(value, getattr(expected, name), **VALUE_TOL[torch.float64], msg=name)
    torch.testing.assert_close(grad, expected_grad, **GRAD_TOL[torch.float64])


def test_a_teacher_sure_of_its_kept_classes_leaves_no_rest():
    """Rows whose kept mass is 1 in float64 (p_rest = 0): the rest term and its gradient vanish."""
    student, target, _, _ = make_inputs(4, 6, 2, torch.float64)
    teacher = torch.full((4, 6), -1e4, dtype=torch.float64)
    teacher[:, :2] = torch.tensor([3.0, 1.0], dtype=torch.float64)
    topk = TopKTeacher.from_logits(teacher, target, 2, 1.0)
    options = LossOptions(temperature=1.0, ce_weight=0.0, kd_weight=1.0, ref_weight=0.0, weighting="constant")
    expected, expected_grad = run_reference(student, target, topk, None, options)
    *values, grad = run_op(student, target, topk, None, options)
    torch.testing.assert_close(values[2], expected.kd, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_the_public_api_runs_the_cpu_kernel_for_top_k():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32, 10, topk=True).name == "cpu"
    student, target, topk, reference = make_inputs(8, 10, 3, torch.float32)
    student.requires_grad_(True)
    results = {}
    for backend in ("cpu", "reference"):
        s = student.detach().clone().requires_grad_(True)
        out = smskd_fast.smskd_loss(s, target, None, reference, teacher_topk=topk, backend=backend)
        out.loss.backward()
        results[backend] = (out.loss.detach(), s.grad)
    torch.testing.assert_close(results["cpu"][0], results["reference"][0], rtol=5e-5, atol=5e-5)
    torch.testing.assert_close(results["cpu"][1], results["reference"][1], rtol=1e-5, atol=2e-6)


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


def assert_matches_reference(student, target, topk, reference, options, dtype, compute_grad=True):
    expected, expected_grad = run_reference(student, target, topk, reference, options)
    *values, grad = run_op(student, target, topk, reference, options, compute_grad)
    for name, value in zip(FIELDS, values):
        torch.testing.assert_close(value.double(), getattr(expected, name).double(), **VALUE_TOL[dtype], msg=name)
    if compute_grad:
        torch.testing.assert_close(grad.double(), expected_grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c, k", [(1023, 10), (1024, 64), (1025, 1), (5000, 37)])
def test_block_boundaries(dtype, c, k):
    """C around the kernel's block of 1024 columns, and several blocks with kept classes in each."""
    options = LossOptions(temperature=2.5, ce_weight=0.4, kd_weight=0.9, ref_weight=0.6, weighting="inverse_tcp")
    student, target, topk, reference = make_inputs(5, c, k, dtype, seed=c, temperature=2.5)
    assert_matches_reference(student, target, topk, reference, options, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_large_vocabulary_with_few_rows(dtype):
    """C = 32000 and N = 3: on two or more threads each row's columns are split among them."""
    options = LossOptions(temperature=1.0, ce_weight=1.0, kd_weight=1.0, ref_weight=0.5, weighting="tcp")
    student, target, topk, reference = make_inputs(3, 32000, 64, dtype, seed=7, temperature=1.0)
    assert_matches_reference(student, target, topk, reference, options, dtype)


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
@pytest.mark.parametrize("c, k", [(40, 39), (40, 40), (1100, 1099), (1100, 1100)])
def test_k_near_c(dtype, c, k):
    options = LossOptions(temperature=3.0, ce_weight=0.3, kd_weight=1.0, ref_weight=0.7)
    student, target, topk, reference = make_inputs(4, c, k, dtype, seed=k, temperature=3.0)
    assert_matches_reference(student, target, topk, reference, options, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(dtype):
    """Strided student and reference columns (read in place), and strided top-k tensors."""
    options = LossOptions(temperature=2.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.5)
    student, target, topk, reference = make_inputs(6, 1500, 12, dtype, seed=3, temperature=2.0)
    strided = [x.t().contiguous().t() for x in (student, reference)]  # column stride N
    assert not strided[0].is_contiguous() and strided[0].stride(1) == 6
    columns = torch.zeros(6, 3000, dtype=dtype)
    columns[:, ::2] = student  # column stride 2
    topk_strided = TopKTeacher(*(torch.stack([t, t], dim=-1)[..., 1] for t in vars(topk).values()))
    assert all(not t.is_contiguous() for t in vars(topk_strided).values())
    expected = run_op(student, target, topk, reference, options)
    for s, r, t in ((strided[0], strided[1], topk), (columns[:, ::2], reference, topk_strided)):
        assert_matches_reference(s, target, t, r, options, dtype)
        for got, want in zip(run_op(s, target, t, r, options), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same kernel on the same values


def test_float64_agrees_to_summation_order_on_wide_logits():
    """Large logit spread (scale 30): the online maxima rescale often; float64 still agrees to 1e-10."""
    options = LossOptions(temperature=1.5, ce_weight=0.5, kd_weight=1.0, ref_weight=0.5)
    student, target, topk, reference = make_inputs(7, 4100, 50, torch.float64, seed=11, scale=30.0,
                                                   temperature=1.5)
    student = student + torch.linspace(0, 200, 4100, dtype=torch.float64)  # maxima rising block after block
    assert_matches_reference(student, target, topk, reference, options, torch.float64)


def test_the_op_refuses_repeated_indices_naming_the_row():
    student, target, topk, reference = make_inputs(4, 6, 3, torch.float32)
    indices = topk.indices.clone()
    indices[3, 2] = indices[3, 1]
    repeated = TopKTeacher(topk.values, indices, topk.true_logit, topk.log_sum_exp, topk.log_sum_exp_at_temperature)
    with pytest.raises(ValueError, match="topk_indices must be distinct within a row, row 3 repeats class"):
        run_op(student, target, repeated, reference, LossOptions())
    with pytest.raises(TypeError, match="topk_values must be a floating tensor"):
        run_op(student, target, TopKTeacher(topk.values.long(), *list(vars(topk).values())[1:]), reference,
               LossOptions())
