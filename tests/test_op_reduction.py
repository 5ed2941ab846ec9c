"""The compiled ops' reduction argument (ops/schema.py REDUCTION, csrc/reduction_arg.h).

reduction="sum" / "mean" makes the op return loss, ce, kd and ref as 0-d sums over the
rows (the mean's over the rows whose target is not ignore_index) and write the gradient
of that reduced loss, so that the public API's mean loss is one dispatch. Oracles: the
same op with reduction="none" (its per-row outputs summed in float64; its gradient with
the mean's grad_scale, which must be equal bit for bit: the kernel is the same),
torch.autograd.gradcheck in float64, torch.library.opcheck. For the CPU op, the Triton ops
(under the interpreter without a GPU) and the CUDA op; the public API's values and
gradients for every backend are tests/test_backend_conformance.py's.
"""
from __future__ import annotations

import pytest
import torch

import smskd_fast
from smskd_fast.backends.base import LossOptions
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.ops.extension import extension_loaded
from smskd_fast.ops.reduction import mean_reduction_scale
from smskd_fast.ops.schema import PER_ROW_OUTPUTS, REDUCED_OUTPUTS
from triton_interpreter import DEVICE, INTERPRETED, needs_kernels, reruns_under_interpreter, run_under_interpreter

OPTIONS = LossOptions(temperature=2.5, ce_weight=0.7, kd_weight=1.3, ref_weight=0.9, weighting="inverse_tcp")
SCALARS = (OPTIONS.temperature, OPTIONS.ce_weight, OPTIONS.kd_weight, OPTIONS.ref_weight, OPTIONS.weighting,
           OPTIONS.ignore_index)
CUDA_OP = smskd_fast.available_backends()["cuda"].available
needs_extension = pytest.mark.skipif(not extension_loaded(), reason="needs the compiled smskd_fast._C")
needs_cuda_op = pytest.mark.skipif(not CUDA_OP, reason="needs a CUDA device and the CUDA build of smskd_fast._C")
# (backend, device): the compiled CPU op, the Triton op (CUDA, or CPU tensors under the interpreter), the CUDA op.
BACKENDS = [pytest.param(("cpu", "cpu"), id="cpu", marks=needs_extension),
            pytest.param(("triton", DEVICE), id="triton", marks=needs_kernels),
            pytest.param(("cuda", "cuda"), id="cuda", marks=needs_cuda_op)]


def case(n, c, dtype, device, *, ignored="some", target=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    student, teacher, reference = ((torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
                                   for _ in range(3))
    labels = torch.randint(0, c, (n,), generator=g)
    if ignored == "some":
        labels[1::3] = -100
    elif ignored == "all":
        labels[:] = -100
    return student, labels.to(device) if target else None, teacher, reference


def op_call(backend, form):
    """The backend's dense or top-k op as f(student, target, teacher, reference, grad_scale, reduction, compute_grad)."""
    suffix = "_triton" if backend == "triton" else ""
    if form == "dense":
        op = getattr(torch.ops.smskd_fast, "smskd_loss_rows" + suffix)

        def call(student, target, teacher, reference, grad_scale=None, reduction="none", compute_grad=True):
            return op(student, target, teacher, reference, *SCALARS, compute_grad, grad_scale, reduction)
    else:
        op = getattr(torch.ops.smskd_fast, "smskd_loss_rows_topk" + suffix)

        def call(student, target, teacher, reference, grad_scale=None, reduction="none", compute_grad=True):
            t = TopKTeacher.from_logits(teacher, target, k=3, temperature=OPTIONS.temperature)
            return op(student, target, t.values, t.indices, t.true_logit, t.log_sum_exp,
                      t.log_sum_exp_at_temperature, reference, *SCALARS, compute_grad, grad_scale, reduction)
    call.op = op
    return call


FORMS = ["dense", "topk"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("ignored, target", [("some", True), ("none", True), ("all", True), ("none", False)],
                         ids=["some-ignored", "none-ignored", "all-ignored", "no-target"])
def test_reduced_op_is_the_per_row_op_summed(backend, form, dtype, reduction, ignored, target):
    name, device = backend
    if dtype == torch.float64 and name != "cpu":
        pytest.skip("the GPU kernels take float32, bfloat16 and float16")
    if not target and form == "topk":
        pytest.skip("the top-k teacher form needs a target for its true-class logit")
    op = op_call(name, form)
    student, labels, teacher, reference = case(9, 11, dtype, device, ignored=ignored, target=target)
    *per_row, row_grad = op(student, labels, teacher, reference)
    valid = torch.ones(9, dtype=torch.bool, device=device) if labels is None else labels != -100
    scale = mean_reduction_scale(valid, student) if reduction == "mean" else None
    *reduced, grad = op(student, labels, teacher, reference, reduction=reduction)

    factor = 1.0 if scale is None else scale.double()
    for name, rows, total in zip(PER_ROW_OUTPUTS, per_row, reduced):
        if name in REDUCED_OUTPUTS:
            assert total.dim() == 0 and total.dtype == rows.dtype, name
            want = rows.double().sum() * factor
            tol = 1e-12 if dtype == torch.float64 else 1e-6
            torch.testing.assert_close(total.double(), want, rtol=tol, atol=tol)
        else:
            assert torch.equal(total, rows), name  # tcp and weight stay per row
    if ignored == "all":
        assert all(float(reduced[k]) == 0.0 for k in range(len(REDUCED_OUTPUTS)))  # 0, not NaN
    # The gradient: the kernel's, with the mean's scale folded in exactly as grad_scale does it.
    *_, scaled_grad = op(student, labels, teacher, reference, grad_scale=scale)
    assert torch.equal(grad, scaled_grad if scale is not None else row_grad)


@needs_extension
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradcheck(form, reduction):
    op = op_call("cpu", form)
    student, labels, teacher, reference = case(5, 7, torch.float64, "cpu")
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: op(s, labels, teacher, reference, reduction=reduction)[0], (student,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype, n, compute_grad", [(torch.float64, 4, True), (torch.bfloat16, 4, True),
                                                    (torch.float32, 3, False), (torch.float32, 0, True)])
def test_opcheck(backend, form, reduction, dtype, n, compute_grad):
    name, device = backend
    if dtype == torch.float64 and name != "cpu":
        pytest.skip("the GPU kernels take float32, bfloat16 and float16")
    student, labels, teacher, reference = case(n, 6, dtype, device)
    student.requires_grad_(compute_grad)
    op = op_call(name, form).op
    if form == "dense":
        args = (student, labels, teacher, reference, *SCALARS, compute_grad, None, reduction)
    else:
        t = TopKTeacher.from_logits(teacher, labels, k=3, temperature=OPTIONS.temperature)
        args = (student, labels, t.values, t.indices, t.true_logit, t.log_sum_exp, t.log_sum_exp_at_temperature,
                reference, *SCALARS, compute_grad, None, reduction)
    utils = None
    if name == "triton" and INTERPRETED:
        # AOT dispatch would run the interpreted kernels on fake tensors (tests/test_triton_backend.py's opcheck).
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op.default, args, **({} if utils is None else {"test_utils": utils}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_bad_reduction_arguments_are_clear_errors(backend, form):
    name, device = backend
    op = op_call(name, form)
    student, labels, teacher, reference = case(3, 5, torch.float32, device)
    with pytest.raises(ValueError, match=r"reduction must be one of 'none', 'sum', 'mean', got 'average'"):
        op(student, labels, teacher, reference, reduction="average")
    with pytest.raises(ValueError, match=r"grad_scale must be None when reduction is 'sum' or 'mean'"):
        op(student, labels, teacher, reference, grad_scale=torch.tensor(0.5), reduction="mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("grad_output", [1.0, 0.37])
@pytest.mark.parametrize("overwrite", [False, True])  # a permission: the CPU backend keeps its own buffer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_of_the_reduced_loss(backend, reduction, grad_output, overwrite, dtype):
    """Through the public API (the eager autograd.Function, or the gradient written over the logits) and
    through the op's registered autograd: the student's gradient is grad_output times the op's written one,
    formed in float32 and rounded once to the logits' dtype."""
    name, device = backend
    op = op_call(name, "dense")
    student, labels, teacher, reference = case(8, 13, dtype, device)
    *_, written = op(student, labels, teacher, reference, reduction=reduction)
    s_api = student.clone().requires_grad_(True)
    options = dict(vars(OPTIONS), overwrite_student_logits=overwrite)
    loss = smskd_fast.smskd_loss(s_api, labels, teacher, reference, **options, reduction=reduction,
                                 backend=name).loss
    (loss * grad_output).backward()
    s_op = student.clone().requires_grad_(True)
    (op(s_op, labels, teacher, reference, reduction=reduction)[0] * grad_output).backward()
    # (On the CPU, the Triton backend's included, backward scales with ATen; on CUDA with a Triton kernel
    # that rounds to nearest as ATen does.)
    want = written if grad_output == 1.0 else (written.float() * grad_output).to(dtype)
    assert torch.equal(s_api.grad, want)
    assert torch.equal(s_op.grad, want)


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file's Triton cases under TRITON_INTERPRET=1 in a fresh interpreter (tests/triton_interpreter.py)."""
    run_under_interpreter(__file__, "-k", "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int8, torch.int32])
def test_narrow_integer_targets_are_counted_as_int64(backend, target_dtype):
    """The mean counts the rows the kernel computes: a uint8 target of class 156 is a class, not
    ignore_index = -100 wrapped to 156; -100 in int8 / int32 is ignore_index."""
    name, device = backend
    op = op_call(name, "dense")
    student, _, teacher, reference = case(4, 160, torch.float32, device)
    labels = [156, 3, 7, 9] if target_dtype == torch.uint8 else [120, -100, 7, 9]
    target = torch.tensor(labels, dtype=target_dtype, device=device)
    per_row = op(student, target, teacher, reference)[0]
    rows = 4 if target_dtype == torch.uint8 else 3
    torch.testing.assert_close(op(student, target, teacher, reference, reduction="mean")[0],
                               per_row.sum() / rows, rtol=1e-6, atol=0)
    api = smskd_fast.smskd_loss(student, target, teacher, reference, backend=name).loss
    if device == "cpu":
        want = smskd_fast.smskd_loss(student, target, teacher, reference, backend="reference").loss
        torch.testing.assert_close(api, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(api, smskd_fast.smskd_loss(student, target.long(), teacher, reference,
                                                          backend=name).loss, rtol=0, atol=0)
