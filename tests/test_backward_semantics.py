"""What backward hands autograd in the corners of the fused backends' "gradient written in forward" design.

- An ignored row's gradient is 0 whatever grad_output holds there, as torch.nn.functional.cross_entropy's
  (a per-sequence mean over a sequence of padding alone sends 0/0 = NaN to its rows): the oracle is
  cross_entropy's own gradient under the same grad_output, NaN and inf at the ignored rows.
- overwrite_student_logits bumps the logits' version counter (Triton as the compiled in-place op), so
  that autograd refuses another saved use of the overwritten values instead of computing with them.
- A student that needs no gradient beside a teacher or reference that requires one: backward runs and
  gives the constants no gradient, as the reference backend does.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import smskd_fast
from smskd_fast.ops.extension import extension_loaded
from triton_interpreter import DEVICE, needs_kernels, reruns_under_interpreter, run_under_interpreter

BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not extension_loaded() or DEVICE != "cpu",
                                                         reason="needs the compiled smskd_fast._C and CPU tensors")),
            pytest.param("triton", marks=needs_kernels), "reference"]


def rows_and_upstream(n=6, c=37):
    generator = torch.Generator().manual_seed(11)
    logits = (torch.randn(n, c, generator=generator) * 3).to(DEVICE)
    target = torch.randint(0, c, (n,), generator=generator).to(DEVICE)
    target[[1, 4]] = -100
    upstream = torch.rand(n, generator=generator).to(DEVICE) + 0.5
    upstream[1], upstream[4] = float("nan"), float("inf")  # only ever reaching ignored rows
    return logits, target, upstream


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overwrite", [False, True], ids=["functional", "overwrite"])
def test_ignored_rows_get_a_zero_gradient_whatever_grad_output_holds(backend, overwrite):
    logits, target, upstream = rows_and_upstream()
    leaf = logits.clone().requires_grad_()
    F.cross_entropy(leaf, target, reduction="none").backward(upstream)
    expected = leaf.grad
    leaf.grad = None
    rows = smskd_fast.smskd_loss(leaf.clone() if overwrite else leaf, target, kd_weight=0.0, ref_weight=0.0,
                                 reduction="none", backend=backend, overwrite_student_logits=overwrite).loss
    rows.backward(upstream)
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[[1, 4]] == 0).all()
    torch.testing.assert_close(leaf.grad, expected, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fused_linear_ignored_rows_get_a_zero_gradient(backend):
    if backend == "cpu" and not extension_loaded():
        pytest.skip("needs the compiled smskd_fast._C")
    generator = torch.Generator().manual_seed(12)
    hidden = torch.randn(6, 8, generator=generator)
    weight = torch.randn(37, 8, generator=generator).requires_grad_()
    _, target, upstream = (x.cpu() for x in rows_and_upstream())
    F.cross_entropy(hidden @ weight.T, target, reduction="none").backward(upstream)
    expected, weight.grad = weight.grad, None
    smskd_fast.fused_linear_smskd_loss(hidden, weight, target, kd_weight=0.0, ref_weight=0.0, reduction="none",
                                       backend=backend).loss.backward(upstream)
    torch.testing.assert_close(weight.grad, expected, rtol=2e-6, atol=2e-6)


@needs_kernels
def test_triton_overwrite_refuses_another_saved_use_of_the_logits():
    """A z-loss saved the logits before the loss overwrote them with its gradient: autograd must refuse."""
    logits, target, _ = rows_and_upstream()
    leaf = logits.clone().requires_grad_()
    scores = leaf * 1.0
    z_loss = torch.logsumexp(scores, dim=-1).pow(2).mean()  # saves scores
    loss = smskd_fast.smskd_loss(scores, target, kd_weight=0.0, ref_weight=0.0, backend="triton",
                                 overwrite_student_logits=True).loss
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + z_loss).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_student_without_gradient_beside_a_teacher_that_requires_one(backend):
    """(w**2).sum() + the loss of a frozen student against a teacher made from w: backward gives w only its
    own term's gradient (the teacher is a constant to the loss), on every backend."""
    logits, target, _ = rows_and_upstream()
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(13)).to(DEVICE).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that the teacher requires grad (tests/test_validation.py)
        total = (w ** 2).sum() + smskd_fast.smskd_loss(logits, target, w * 2, backend=backend).loss
    total.backward()
    torch.testing.assert_close(w.grad, 2 * w.detach(), rtol=0, atol=0)


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file's Triton cases under TRITON_INTERPRET=1 in a fresh interpreter (tests/triton_interpreter.py)."""
    run_under_interpreter(__file__, "-k", "triton")
