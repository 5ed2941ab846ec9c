"""The autograd wiring of overwrite_student_logits (GradientInStudent), checked on the CPU.

smskd_loss_rows_inplace_ has only a CUDA kernel; here a float64 closed-form
stand-in is registered for the CPU key for the duration of each test, so that
the wrapper's behaviour (the gradient lands in the logits' storage, backward
scales it in place, a second backward is refused) is tested without a GPU
against the reference backend's autograd gradient. The GPU test of the real
kernel is tests/test_cuda_backend.py.
"""
import pytest
import torch
import torch.nn.functional as F

from smskd_fast.ops import registration as ops
from smskd_fast.ops.extension import extension_loaded
from smskd_fast.backends.base import LossOptions, RowInputs
from smskd_fast.backends.native import GradientInStudent
from smskd_fast.backends.reference import ReferenceBackend
from smskd_fast.ops.reduction import reduce_per_row_outputs, reduction_grad_scale

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="smskd_fast._C is not built (it holds the schema)")


def closed_form_inplace(student, target, teacher, reference, temperature, ce_weight, kd_weight, ref_weight,
                        weighting, ignore_index, grad_scale=None, reduction="none"):
    """SPEC.md section 2's gradient (times grad_scale, or the reduction's scale) written over student; the
    per-row terms from the reference backend, reduced as the op reduces them (ops/reduction.py)."""
    grad_scale = reduction_grad_scale(reduction, grad_scale, target, student, ignore_index, "stand-in")
    options = LossOptions(temperature, ce_weight, kd_weight, ref_weight, weighting, ignore_index)
    rows = ReferenceBackend().rows(RowInputs(student.detach(), target, teacher, reference), options)
    T = temperature
    s = student.double()
    valid = (target != ignore_index).unsqueeze(-1)
    q = F.softmax(s / T, dim=-1)
    onehot = F.one_hot(torch.where(valid.squeeze(-1), target, 0), s.shape[-1]).double()
    grad = ce_weight * (F.softmax(s, dim=-1) - onehot)
    grad += T * kd_weight * (q - F.softmax(teacher.double() / T, dim=-1))
    grad += T * ref_weight * rows.weight.double().unsqueeze(-1) * (q - F.softmax(reference.double() / T, dim=-1))
    if grad_scale is not None:
        grad *= grad_scale
    student.copy_(torch.where(valid, grad, 0.0))
    outputs = tuple(x.detach().clone() for x in (rows.loss, rows.ce, rows.kd, rows.ref, rows.tcp, rows.weight))
    return outputs if reduction == "none" else reduce_per_row_outputs(outputs, grad_scale)


@pytest.fixture
def cpu_inplace_op():
    library = torch.library.Library("smskd_fast", "IMPL")
    library.impl(ops.INPLACE_OP_NAME.split("::")[1], closed_form_inplace, "CPU")
    yield
    library._destroy()


def make_inputs(n=6, c=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    student, teacher, reference = (3 * torch.randn(3, n, c, generator=g, dtype=torch.float64)).unbind(0)
    target = torch.randint(0, c, (n,), generator=g)
    target[2] = -100
    return student, target, teacher, reference


OPTIONS = LossOptions(temperature=2.0, ce_weight=0.7, kd_weight=1.3, ref_weight=0.9, weighting="inverse_tcp")


def reference_gradient(student, target, teacher, reference, v):
    x = student.clone().requires_grad_(True)
    rows = ReferenceBackend().rows(RowInputs(x, target, teacher, reference), OPTIONS)
    (rows.loss * v).sum().backward()
    return rows.loss.detach(), x.grad


@pytest.mark.parametrize("grad_scale", [None, 0.2])
def test_gradient_lands_in_the_logits_and_matches_the_reference(cpu_inplace_op, grad_scale):
    """With grad_scale the forward writes grad_scale times the gradient and backward divides it out again."""
    student, target, teacher, reference = make_inputs()
    v = torch.linspace(0.5, 1.5, student.shape[0], dtype=torch.float64)
    want_loss, want_grad = reference_gradient(student, target, teacher, reference, v)

    leaf = student.clone().requires_grad_(True)
    logits = leaf * 1  # a non-leaf, as an lm head's output
    scale = None if grad_scale is None else torch.tensor(grad_scale, dtype=torch.float64)
    loss, *_ = GradientInStudent.apply(logits, target, teacher, reference, scale, "none", OPTIONS)
    torch.testing.assert_close(loss, want_loss)
    assert not torch.equal(logits.detach(), student)  # overwritten by the forward
    (loss * v).sum().backward()
    torch.testing.assert_close(leaf.grad, want_grad)
    torch.testing.assert_close(logits.detach(), want_grad)  # scaled in place by backward


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduced_loss_gradient_lands_in_the_logits(cpu_inplace_op, reduction):
    """With the op's own reduction the loss is 0-d and backward scales the written gradient by grad_output."""
    student, target, teacher, reference = make_inputs()
    count = (target != OPTIONS.ignore_index).sum().item() if reduction == "mean" else 1
    v = torch.full((student.shape[0],), 0.5 / count, dtype=torch.float64)
    want_loss, want_grad = reference_gradient(student, target, teacher, reference, v)

    leaf = student.clone().requires_grad_(True)
    logits = leaf * 1
    loss, *_ = GradientInStudent.apply(logits, target, teacher, reference, None, reduction, OPTIONS)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, want_loss.sum() / count)
    (loss * 0.5).backward()
    torch.testing.assert_close(leaf.grad, want_grad)


def test_second_backward_is_refused(cpu_inplace_op):
    student, target, teacher, reference = make_inputs()
    logits = student.clone().requires_grad_(True) * 1
    loss = GradientInStudent.apply(logits, target, teacher, reference, None, "none", OPTIONS)[0].sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_a_saved_use_of_the_overwritten_logits_is_refused(cpu_inplace_op):
    """Autograd must refuse (not silently misuse) logits that another op saved before they were overwritten."""
    student, target, teacher, reference = make_inputs()
    logits = student.clone().requires_grad_(True) * 1
    saved_by_sin = logits.sin().sum()  # sin saves its input for backward
    loss = GradientInStudent.apply(logits, target, teacher, reference, None, "none", OPTIONS)[0].sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + saved_by_sin).backward()
