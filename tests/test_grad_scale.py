"""The ops' grad_scale argument and the backward that it lets do nothing (ops/schema.py, GRAD_SCALE).

The compiled ops write grad_scale * d loss_i / d student_i; the public API passes
the mean's 1/n there, and backward divides it out of grad_output, scaling only
rows whose factor is not exactly 1 (ops/scale_rows.py). Oracles: the float64
reference backend (autograd through torch operations), the same op without
grad_scale, torch.library.opcheck. The Triton ops' own cases:
tests/test_grad_scale_triton.py; every backend's mean/sum/none gradients against
float64 are in tests/test_backend_conformance.py.
"""
from __future__ import annotations

import pytest
import torch

import smskd_fast
from smskd_fast.backends.base import LossOptions, RowInputs
from smskd_fast.backends.reference import ReferenceBackend
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.ops.scale_rows import scale_rows_
from smskd_fast.ops.schema import PER_ROW_OUTPUTS, accumulation_dtype
from conftest import assert_bitwise_equal, signaling_nan
from tolerances import backend_tolerance

DENSE = torch.ops.smskd_fast.smskd_loss_rows
TOPK = torch.ops.smskd_fast.smskd_loss_rows_topk
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
OPTIONS = LossOptions(temperature=2.5, ce_weight=0.7, kd_weight=1.3, ref_weight=0.9, weighting="inverse_tcp")

pytestmark = pytest.mark.skipif(
    not smskd_fast.available_backends()["cpu"].available,
    reason=f"the C++ CPU kernel is not built: {smskd_fast.available_backends()['cpu'].reason}",
)


def rows(n, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    student, teacher, reference = ((torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype)
                                   for _ in range(3))
    target = torch.randint(0, c, (n,), generator=g)
    target[1::4] = -100
    return student, target, teacher, reference


def scalars(options=OPTIONS):
    return (options.temperature, options.ce_weight, options.kd_weight, options.ref_weight, options.weighting,
            options.ignore_index)


def dense_op(student, target, teacher, reference, grad_scale=None):
    return DENSE(student, target, teacher, reference, *scalars(), True, grad_scale)


def topk_op(student, target, teacher, reference, grad_scale=None):
    topk = TopKTeacher.from_logits(teacher, target, k=5, temperature=OPTIONS.temperature)
    return TOPK(student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
                topk.log_sum_exp_at_temperature, reference, *scalars(), True, grad_scale)


def reference_grad(student, target, teacher, reference, topk: bool):
    """d(sum_i loss_i)/d student in float64 through the reference backend."""
    s = student.double().requires_grad_(True)
    teacher_topk = TopKTeacher.from_logits(teacher, target, k=5, temperature=OPTIONS.temperature) if topk else None
    inputs = RowInputs(s, target, None if topk else teacher.double(), reference.double(), teacher_topk=teacher_topk)
    (grad,) = torch.autograd.grad(ReferenceBackend().rows(inputs, OPTIONS).loss.sum(), s)
    return grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [dense_op, topk_op], ids=["dense", "topk"])
@pytest.mark.parametrize("scale", [0.375, 1 / 3, 1 / 1000])
def test_grad_scale_multiplies_the_gradient_and_nothing_else(dtype, op, scale):
    student, target, teacher, reference = rows(12, 37, dtype)
    grad_scale = torch.tensor(scale, dtype=accumulation_dtype(dtype))
    *plain_rows, _ = op(student, target, teacher, reference)
    *scaled_rows, grad = op(student, target, teacher, reference, grad_scale)
    for name, plain, scaled in zip(PER_ROW_OUTPUTS, plain_rows, scaled_rows):
        assert torch.equal(plain, scaled), f"{name} must not be scaled"
    want = reference_grad(student, target, teacher, reference, topk=op is topk_op) * float(grad_scale)
    _, grad_tol = backend_tolerance("cpu", dtype, temperature=OPTIONS.temperature, num_classes=37,
                                    topk=op is topk_op, row_weights=False, max_abs_logit=0.0, weight_sum=0.0,
                                    grad_scale=0.0)
    # The gradient's entries scale with grad_scale, so its absolute tolerance does too, down to
    # half the spacing of the dtype's subnormals (float16's 2**-25: small entries times 1/1000 are subnormal).
    finfo = torch.finfo(dtype)
    atol = max(grad_tol["atol"] * scale, finfo.smallest_normal * finfo.eps / 2)
    torch.testing.assert_close(grad.double(), want, rtol=grad_tol["rtol"], atol=atol)
    assert (grad[target == -100] == 0).all()


@pytest.mark.parametrize("op", [dense_op, topk_op], ids=["dense", "topk"])
def test_no_grad_scale_and_a_scale_of_one_give_the_same_bits(op):
    student, target, teacher, reference = rows(9, 50, torch.bfloat16)
    omitted = op(student, target, teacher, reference)
    one = op(student, target, teacher, reference, torch.tensor(1.0))
    for a, b in zip(omitted, one):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mean_backward_with_grad_output_one_returns_the_forward_gradient_untouched(dtype):
    """The mean's gradient is the kernel's output, bit for bit: no second rounding in backward."""
    student, target, teacher, reference = rows(16, 64, dtype)
    s = student.clone().requires_grad_(True)
    smskd_fast.smskd_loss(s, target, teacher, reference, **vars(OPTIONS), backend="cpu").loss.backward()
    valid = int((target != -100).sum())
    *_, kernel_grad = dense_op(student, target, teacher, reference, torch.tensor(1.0 / valid))
    assert torch.equal(s.grad, kernel_grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grad_output", [1.0, 0.3])
def test_reductions_match_the_float64_reference(reduction, grad_output):
    student, target, teacher, reference = rows(16, 40, torch.float32)
    s = student.clone().requires_grad_(True)
    out = smskd_fast.smskd_loss(s, target, teacher, reference, **vars(OPTIONS), reduction=reduction, backend="cpu")
    weights = torch.full(out.loss.shape, grad_output)
    (got,) = torch.autograd.grad(out.loss, s, grad_outputs=weights)
    s64 = student.double().requires_grad_(True)
    want_out = smskd_fast.smskd_loss(s64, target, teacher.double(), reference.double(), **vars(OPTIONS),
                                     reduction=reduction, backend="reference")
    (want,) = torch.autograd.grad(want_out.loss, s64, grad_outputs=weights.double())
    torch.testing.assert_close(out.loss.double(), want_out.loss.detach(), rtol=5e-5, atol=5e-5)
    _, grad_tol = backend_tolerance("cpu", torch.float32, temperature=OPTIONS.temperature, num_classes=40,
                                    topk=False, row_weights=True, max_abs_logit=0.0, weight_sum=0.0, grad_scale=0.0)
    torch.testing.assert_close(got.double(), want, **grad_tol)


def test_kd_loss_mean_folds_one_over_n():
    student, _, teacher, _ = rows(10, 30, torch.float32)
    s = student.clone().requires_grad_(True)
    smskd_fast.kd_loss(s, teacher, temperature=3.0, backend="cpu").backward()
    s64 = student.double().requires_grad_(True)
    torch.nn.functional.kl_div(torch.log_softmax(s64 / 3.0, -1), torch.softmax(teacher.double() / 3.0, -1),
                               reduction="batchmean").mul(9.0).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=2e-6, atol=1e-8)


# Backward scales the op's grad output in place when the graph is freed (ops/registration.py: the
# public API never shows that output). opcheck's AOT test compares the op's outputs after an eager
# backward with grad_output = 1, which leaves them unchanged only when grad_scale is 1; the other
# checks (schema, fake tensors, autograd registration) run with a scale of 0.25 too.
OPCHECK_SCALES = ((1.0, ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")),
                  (0.25, ("test_schema", "test_autograd_registration", "test_faketensor")))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale,test_utils", OPCHECK_SCALES, ids=["scale1", "scale0.25"])
def test_opcheck_with_grad_scale(dtype, scale, test_utils):
    student, target, teacher, reference = rows(5, 9, dtype)
    student.requires_grad_(True)
    grad_scale = torch.tensor(scale, dtype=accumulation_dtype(dtype))
    torch.library.opcheck(DENSE.default, (student, target, teacher, reference, *scalars(), True, grad_scale),
                          test_utils=test_utils)
    topk = TopKTeacher.from_logits(teacher, target, k=3, temperature=OPTIONS.temperature)
    torch.library.opcheck(TOPK.default, (student, target, topk.values, topk.indices, topk.true_logit,
                                         topk.log_sum_exp, topk.log_sum_exp_at_temperature, reference,
                                         *scalars(), True, grad_scale), test_utils=test_utils)


def test_bad_grad_scale_is_a_clear_error():
    student, target, teacher, reference = rows(4, 7, torch.float32)
    with pytest.raises(ValueError, match=r"grad_scale must be a 0-d tensor \(one value\), got shape \[2\]"):
        dense_op(student, target, teacher, reference, torch.ones(2))
    with pytest.raises(TypeError, match="grad_scale must be Float .*got Double"):
        dense_op(student, target, teacher, reference, torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(TypeError, match="grad_scale must be Double .*got Float"):
        dense_op(student.double(), target, teacher.double(), reference.double(), torch.tensor(0.5))
    with pytest.raises(ValueError, match="grad_scale must be a 0-d tensor"):
        topk_op(student, target, teacher, reference, torch.ones(1, 1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_scale_rows_leaves_rows_of_factor_one_alone_and_rounds_the_others_once(dtype):
    grad = torch.randn(6, 11, dtype=torch.float64).to(dtype)
    grad[0, 0] = signaling_nan(dtype)  # x 1 would make it a quiet NaN: kept bits show the row was skipped
    original = grad.clone()
    factor = torch.ones(6, dtype=accumulation_dtype(dtype))
    assert scale_rows_(grad, factor) is grad
    assert_bitwise_equal(grad, original)
    grad[0, 0] = 0.5  # the CPU multiplies every row once any factor is not 1 (x 1 keeps finite values)
    original = grad.clone()
    factor[2] = 0.3
    scale_rows_(grad, factor)
    assert_bitwise_equal(grad, (original.to(factor.dtype) * factor[:, None]).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_scale_rows_with_one_factor_for_all_rows(dtype):
    """A 0-d factor (a reduced loss's grad_output): 1 leaves the gradient's bits alone, another value scales
    every row, rounded once."""
    grad = torch.randn(6, 11, dtype=torch.float64).to(dtype)
    grad[3, 4] = signaling_nan(dtype)  # x 1 would make it a quiet NaN: kept bits show nothing was computed
    original = grad.clone()
    one = torch.ones((), dtype=accumulation_dtype(dtype))
    assert scale_rows_(grad, one) is grad
    assert_bitwise_equal(grad, original)
    grad[3, 4] = 0.5
    original = grad.clone()
    factor = torch.tensor(0.3, dtype=accumulation_dtype(dtype))
    scale_rows_(grad, factor)
    assert_bitwise_equal(grad, (original.to(factor.dtype) * factor).to(dtype))


def test_scale_rows_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"grad must be \(N, C\) and factor \(N,\) or 0-d"):
        scale_rows_(torch.zeros(3, 4), torch.ones(4))


needs_cuda_op = pytest.mark.skipif(not smskd_fast.available_backends()["cuda"].available,
                                   reason="needs a CUDA device and the CUDA build of smskd_fast._C")


@needs_cuda_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", [dense_op, topk_op], ids=["dense", "topk"])
def test_cuda_op_scales_the_gradient_and_nothing_else(dtype, op):
    student, target, teacher, reference = (x.cuda() for x in rows(12, 300, dtype))
    grad_scale = torch.tensor(1 / 3, device="cuda")
    *plain_rows, plain_grad = op(student, target, teacher, reference)
    *scaled_rows, grad = op(student, target, teacher, reference, grad_scale)
    for name, plain, scaled in zip(PER_ROW_OUTPUTS, plain_rows, scaled_rows):
        assert torch.equal(plain, scaled), f"{name} must not be scaled"
    want = reference_grad(student.cpu(), target.cpu(), teacher.cpu(), reference.cpu(), topk=op is topk_op) / 3
    _, grad_tol = backend_tolerance("cuda", dtype, temperature=OPTIONS.temperature, num_classes=300,
                                    topk=op is topk_op, row_weights=True, max_abs_logit=12.0, weight_sum=3.0,
                                    grad_scale=OPTIONS.ce_weight + OPTIONS.temperature * 2.2)
    torch.testing.assert_close(grad.double().cpu(), want, **grad_tol)
    with pytest.raises(ValueError, match="grad_scale must be on the student's device"):
        op(student, target, teacher, reference, grad_scale.cpu())


@needs_cuda_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("columns", [1, 5, 4097])
def test_scale_rows_on_cuda_leaves_rows_of_factor_one_alone(dtype, columns):
    storage = torch.randn(7, columns + 3, device="cuda").to(dtype)
    grad = storage[:, :columns]  # rows with a stride larger than C, as the student's own storage may have
    original = storage.clone()
    factor = torch.ones(7, device="cuda")
    factor[[1, 4]] = torch.tensor([0.3, -2.0], device="cuda")
    scale_rows_(grad, factor)
    want = original.clone()
    want[:, :columns] = (original[:, :columns].float() * factor[:, None]).to(dtype)
    assert torch.equal(storage, want)


@needs_cuda_op
def test_cuda_mean_backward_returns_the_forward_gradient_untouched():
    student, target, teacher, reference = (x.cuda() for x in rows(16, 640, torch.bfloat16))
    s = student.clone().requires_grad_(True)
    smskd_fast.smskd_loss(s, target, teacher, reference, **vars(OPTIONS), backend="cuda").loss.backward()
    valid = int((target != -100).sum())
    *_, kernel_grad = dense_op(student, target, teacher, reference, torch.tensor(1.0 / valid, device="cuda"))
    assert torch.equal(s.grad, kernel_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_mean_reduction_scale_is_one_over_the_count(dtype):
    """1 / max(valid rows, 1) in the accumulation dtype, the count exact on either side of the float32
    integer limit (2^24 + 3 rows: counted as an integer and then rounded, like n itself)."""
    from smskd_fast.ops.reduction import mean_reduction_scale

    student = torch.zeros(1, 3, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cases = [(torch.zeros(0, dtype=torch.bool), 1), (torch.tensor([True, False, True, True, False]), 3),
             (torch.zeros(4, dtype=torch.bool), 1), (torch.ones(2 ** 24 + 3, dtype=torch.bool), 2 ** 24 + 3), (7, 7)]
    for valid, count in cases + [(torch.tensor(True), 1), (torch.tensor(False), 1)]:  # a 0-d mask: one row
        got = mean_reduction_scale(valid, student)
        assert got.dtype == acc and got.dim() == 0
        assert got.item() == torch.tensor(float(count), dtype=acc).reciprocal().item(), count
    # B samples' (B, N) mask (the vmap rule's per-sample means): each sample's scale, as its own call gives it
    masks = torch.tensor([[True, False, True, True, False], [False] * 5, [True] * 5])
    torch.testing.assert_close(mean_reduction_scale(masks, student),
                               torch.stack([mean_reduction_scale(mask, student) for mask in masks]), rtol=0, atol=0)
