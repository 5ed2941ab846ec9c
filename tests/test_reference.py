"""The reference backend against the independent float64 closed form of SPEC.md section 2."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import smskd_fast
from closed_form import closed_form
from conftest import make_logits

WEIGHTINGS = ["inverse_tcp", "tcp", "constant"]


def reference_loss(*args, **kwargs):
    return smskd_fast.smskd_loss(*args, backend="reference", **kwargs)


def per_row_and_grad(student, target, teacher, reference, **options):
    student = student.detach().clone().requires_grad_(True)
    out = reference_loss(student, target, teacher, reference, reduction="none", **options)
    out.loss.sum().backward()
    return out, student.grad


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (16, 100), (3, 4, 33)])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_values_and_gradient_match_closed_form(shape, weighting, temperature):
    student, target, teacher, reference = make_logits(shape, ignore_every=3)
    options = dict(temperature=temperature, ce_weight=0.7, kd_weight=1.3, ref_weight=0.9, weighting=weighting)
    out, grad = per_row_and_grad(student, target, teacher, reference, **options)
    c = shape[-1]
    want, want_grad = closed_form(student.reshape(-1, c).numpy(), target.reshape(-1).numpy(),
                                  teacher.reshape(-1, c).numpy(), reference.reshape(-1, c).numpy(),
                                  T=temperature, **{k: v for k, v in options.items() if k != "temperature"})
    for key in ("loss", "ce", "kd", "ref"):
        np.testing.assert_allclose(getattr(out, key).detach().reshape(-1).numpy(), want[key], rtol=1e-10, atol=1e-12,
                                   err_msg=key)
    np.testing.assert_allclose(out.tcp.reshape(-1).numpy(), want["tcp"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(out.weight.reshape(-1).numpy(), want["weight"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grad.reshape(-1, c).numpy(), want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("present", ["none", "teacher", "reference", "both"])
def test_absent_terms_are_zero(present):
    student, target, teacher, reference = make_logits((6, 9))
    teacher = teacher if present in ("teacher", "both") else None
    reference = reference if present in ("reference", "both") else None
    weighting = "constant" if teacher is None else "inverse_tcp"
    out, grad = per_row_and_grad(student, target, teacher, reference, weighting=weighting)
    want, want_grad = closed_form(student.numpy(), target.numpy(),
                                  None if teacher is None else teacher.numpy(),
                                  None if reference is None else reference.numpy(), weighting=weighting)
    np.testing.assert_allclose(out.loss.detach().numpy(), want["loss"], rtol=1e-10)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-9, atol=1e-12)
    if teacher is None:
        assert torch.all(out.kd == 0) and torch.all(out.tcp == 0)
    if reference is None:
        assert torch.all(out.ref == 0)


def test_cross_entropy_alone_is_torch_cross_entropy():
    student, target, _, _ = make_logits((10, 13), ignore_every=4)
    ours = reference_loss(student, target).loss
    torch.testing.assert_close(ours, F.cross_entropy(student, target), rtol=1e-12, atol=0)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_gradcheck_float64(weighting):
    student, target, teacher, reference = make_logits((4, 6), ignore_every=3)
    student.requires_grad_(True)

    def loss(s):
        return reference_loss(s, target, teacher, reference, temperature=2.0, weighting=weighting).loss

    assert torch.autograd.gradcheck(loss, (student,))
    assert torch.autograd.gradgradcheck(loss, (student,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    student, target, teacher, reference = make_logits((3, 4, 10), ignore_every=5)
    rows = reference_loss(student, target, teacher, reference, reduction="none")
    out = reference_loss(student, target, teacher, reference, reduction=reduction)
    valid = (target != -100).sum()
    for key in ("loss", "ce", "kd", "ref"):
        per_row = getattr(rows, key)
        assert per_row.shape == target.shape
        expected = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / valid}[reduction]
        torch.testing.assert_close(getattr(out, key), expected, rtol=1e-12, atol=0)
    assert out.tcp.shape == target.shape and out.weight.shape == target.shape


def test_ignored_rows_contribute_nothing_even_with_nan_logits():
    student, target, teacher, reference = make_logits((6, 5))
    target[1] = -100
    student[1] = float("nan")
    teacher[1] = float("nan")
    out, grad = per_row_and_grad(student, target, teacher, reference)
    assert out.loss[1] == 0 and out.tcp[1] == 0 and out.weight[1] == 0
    assert torch.all(grad[1] == 0)
    assert torch.isfinite(out.loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored_gives_zero_loss_and_gradient(reduction):
    student, target, teacher, reference = make_logits((4, 7))
    target[:] = -100
    student.requires_grad_(True)
    out = reference_loss(student, target, teacher, reference, reduction=reduction)
    out.loss.backward()
    assert out.loss.item() == 0.0 and not torch.isnan(out.loss)
    assert torch.all(student.grad == 0)


def test_custom_ignore_index():
    student, target, teacher, reference = make_logits((5, 6))
    target[2] = 3
    out = reference_loss(student, target, teacher, reference, ignore_index=3, reduction="none")
    assert out.loss[2] == 0
    want, _ = closed_form(student.numpy(), target.numpy(), teacher.numpy(), reference.numpy(), ignore_index=3)
    np.testing.assert_allclose(out.loss.detach().numpy(), want["loss"], rtol=1e-10)


def test_leading_dimensions_equal_flattened_rows():
    student, target, teacher, reference = make_logits((2, 3, 11), ignore_every=4)
    nested = reference_loss(student, target, teacher, reference, reduction="none")
    flat = reference_loss(student.reshape(6, 11), target.reshape(6), teacher.reshape(6, 11),
                          reference.reshape(6, 11), reduction="none")
    torch.testing.assert_close(nested.loss.reshape(6), flat.loss, rtol=0, atol=0)
    assert nested.loss.shape == (2, 3)


def test_single_class_has_zero_loss_and_gradient():
    student, target, teacher, reference = make_logits((4, 1))
    out, grad = per_row_and_grad(student, target, teacher, reference)
    assert torch.all(out.loss == 0) and torch.all(grad == 0)
    assert torch.all(out.tcp == 1) and torch.all(out.weight == 0)


@pytest.mark.parametrize("weighting, expected", [("inverse_tcp", lambda p: 1 - p), ("tcp", lambda p: p),
                                                  ("constant", lambda p: torch.ones_like(p))])
def test_weighting_modes_follow_teacher_true_class_probability(weighting, expected):
    student, target, teacher, reference = make_logits((8, 5))
    out = reference_loss(student, target, teacher, reference, weighting=weighting, reduction="none")
    tcp = torch.softmax(teacher, -1).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(out.tcp, tcp, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.weight, expected(tcp), rtol=1e-12, atol=0)
    torch.testing.assert_close(smskd_fast.true_class_probability(teacher, target), tcp, rtol=1e-12, atol=0)


def test_masked_vocabulary_entries_are_finite_where_the_math_is():
    student, target, teacher, reference = make_logits((4, 8))
    for logits in (student, teacher, reference):
        logits[:, 5] = float("-inf")
    target[target == 5] = 0
    out, grad = per_row_and_grad(student, target, teacher, reference)
    want, want_grad = closed_form(student.numpy(), target.numpy(), teacher.numpy(), reference.numpy())
    assert torch.isfinite(out.loss).all() and torch.isfinite(grad).all()
    np.testing.assert_allclose(out.loss.detach().numpy(), want["loss"], rtol=1e-10)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-9, atol=1e-12)


# Low precision: inputs are rounded to the dtype, then the math runs in fp32. The
# oracle is float64 on the same rounded inputs, so the only error left is fp32
# accumulation (about 1e-6 relative) and, for the gradient, its rounding to the
# input dtype (2^-8 for bf16, 2^-11 for fp16).
LOW_PRECISION = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 8e-3), torch.float16: (1e-5, 1e-3)}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
def test_low_precision_inputs_match_float64_on_the_same_values(dtype):
    student, target, teacher, reference = make_logits((32, 50), dtype=dtype, ignore_every=7)
    out, grad = per_row_and_grad(student, target, teacher, reference)
    assert out.loss.dtype == torch.float32 and grad.dtype == dtype
    want, want_grad = per_row_and_grad(student.double(), target, teacher.double(), reference.double())
    loss_rtol, grad_rtol = LOW_PRECISION[dtype]
    torch.testing.assert_close(out.loss, want.loss.float(), rtol=loss_rtol, atol=loss_rtol)
    scale = want_grad.abs().max()
    torch.testing.assert_close(grad.double(), want_grad, rtol=grad_rtol, atol=grad_rtol * scale)


def test_kd_loss_is_batchmean_kl_times_t_squared():
    student, _, teacher, _ = make_logits((7, 12))
    for T in (1.0, 4.0):
        want = T * T * F.kl_div(F.log_softmax(student / T, -1), F.softmax(teacher / T, -1),
                                reduction="batchmean")
        got = smskd_fast.kd_loss(student, teacher, temperature=T, backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    rows = smskd_fast.kd_loss(student, teacher, reduction="none", backend="reference")
    assert rows.shape == (7,)
    torch.testing.assert_close(rows.sum(), smskd_fast.kd_loss(student, teacher, reduction="sum",
                                                              backend="reference"))


def test_module_wrappers_match_functional():
    student, target, teacher, reference = make_logits((5, 6))
    module = smskd_fast.SMSKDLoss(temperature=2.0, weighting="tcp", backend="reference")
    torch.testing.assert_close(module(student, target, teacher, reference).loss,
                               reference_loss(student, target, teacher, reference, temperature=2.0,
                                              weighting="tcp").loss)
    kd = smskd_fast.KDLoss(temperature=3.0, backend="reference")
    torch.testing.assert_close(kd(student, teacher), smskd_fast.kd_loss(student, teacher, temperature=3.0))
    assert "temperature=2.0" in repr(module)


def test_outputs_other_than_loss_are_detached():
    student, target, teacher, reference = make_logits((3, 4))
    student.requires_grad_(True)
    out = reference_loss(student, target, teacher, reference)
    assert out.loss.requires_grad
    for key in ("ce", "kd", "ref", "tcp", "weight"):
        assert not getattr(out, key).requires_grad, key


def test_registry_reports_reference_and_why_others_are_not_available():
    statuses = smskd_fast.available_backends()
    assert statuses["reference"].available and bool(statuses["reference"])
    for name, status in statuses.items():
        assert isinstance(status.reason, str) and status.reason, name
