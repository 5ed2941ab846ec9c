"""The top-k teacher form: exact TCP, exact when k = C, the coarsened KL otherwise, and its gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import smskd_fast
from closed_form import lse, softmax
from conftest import make_logits
from smskd_fast.topk import TopKTeacher


def topk_closed_form(s, t, y, k, T):
    """Per row T^2 KL(p~||q) and its gradient T (q - p~), written from the definition in float64."""
    losses, grads = [], []
    for si, ti in zip(s, t):
        kept = np.argsort(-ti, kind="stable")[:k]
        rest = np.setdiff1d(np.arange(len(si)), kept)
        p, q = softmax(ti / T), softmax(si / T)
        p_tilde = np.zeros_like(p)
        p_tilde[kept] = p[kept]
        p_rest = 1.0 - p[kept].sum()
        if len(rest):
            p_tilde[rest] = p_rest * q[rest] / q[rest].sum()
        support = p_tilde > 0
        losses.append(T * T * np.sum(p_tilde[support] * np.log(p_tilde[support] / q[support])))
        grads.append(T * (q - p_tilde))
    return np.array(losses), np.array(grads)


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_loss_and_gradient_match_the_definition(k, T):
    student, target, teacher, _ = make_logits((6, 10), with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, k, T)
    student.requires_grad_(True)
    out = smskd_fast.smskd_loss(student, target, teacher_topk=topk, temperature=T, ce_weight=0.0,
                                reduction="none", backend="reference")
    out.loss.sum().backward()
    want, want_grad = topk_closed_form(student.detach().numpy(), teacher.numpy(), target, k, T)
    np.testing.assert_allclose(out.kd.numpy(), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(student.grad.numpy(), want_grad, rtol=1e-8, atol=1e-12)


def test_k_equal_to_c_is_the_dense_loss_and_tcp_is_always_exact():
    student, target, teacher, reference = make_logits((5, 8), ignore_every=3)
    dense = smskd_fast.smskd_loss(student, target, teacher, reference, reduction="none", backend="reference")
    for k in (8, 2):
        topk = TopKTeacher.from_logits(teacher, target, k, 4.0)
        out = smskd_fast.smskd_loss(student, target, None, reference, teacher_topk=topk, reduction="none",
                                    backend="reference")
        torch.testing.assert_close(out.tcp, dense.tcp, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.weight, dense.weight, rtol=1e-12, atol=0)
        if k == 8:
            torch.testing.assert_close(out.loss, dense.loss, rtol=1e-12, atol=1e-12)
        else:  # coarsening never increases a KL
            assert torch.all(out.kd <= dense.kd + 1e-12)


def test_gradcheck_float64():
    student, target, teacher, _ = make_logits((4, 6), with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, 2, 2.0)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: smskd_fast.smskd_loss(s, target, teacher_topk=topk, temperature=2.0, backend="reference").loss,
        (student,))


def test_auto_picks_a_backend_that_accepts_topk_and_others_refuse():
    student, target, teacher, _ = make_logits((3, 5), dtype=torch.float32, with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, 2, 4.0)
    smskd_fast.smskd_loss(student, target, teacher_topk=topk)  # auto
    without = [name for name, status in smskd_fast.available_backends().items()
               if status and name != "reference"
               and not getattr(smskd_fast.backends.registry._BACKENDS[name][1], "supports_topk", False)]
    for name in without:
        if smskd_fast.backends.registry._BACKENDS[name][1].supports(student.device):
            with pytest.raises(ValueError, match=f"backend '{name}' does not accept teacher_topk"):
                smskd_fast.smskd_loss(student, target, teacher_topk=topk, backend=name)


def test_bad_topk_arguments():
    student, target, teacher, _ = make_logits((3, 5), dtype=torch.float32, with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, 2, 4.0)
    with pytest.raises(ValueError, match="either as teacher_logits or as teacher_topk, not both"):
        smskd_fast.smskd_loss(student, target, teacher, teacher_topk=topk)
    bad = TopKTeacher(topk.values, topk.indices, topk.true_logit[:2], topk.log_sum_exp,
                      topk.log_sum_exp_at_temperature)
    with pytest.raises(ValueError, match=r"teacher_topk.true_logit must have shape \(3,\)"):
        smskd_fast.smskd_loss(student, target, teacher_topk=bad)
    bad = TopKTeacher(topk.values, topk.indices + 5, *list(vars(topk).values())[2:])
    with pytest.raises(ValueError, match=r"teacher_topk.indices must be in \[0, 5\)"):
        smskd_fast.smskd_loss(student, target, teacher_topk=bad)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\], got 6"):
        TopKTeacher.from_logits(teacher, target, 6, 4.0)
