"""Top-k teacher test cases shared by the backends' tests, and their float64 oracle.

make_inputs draws a student, a reference and a dense teacher and keeps the
teacher's top-k form; run_reference runs the pure-PyTorch reference backend in
float64 on the same, exactly upcast, values and returns its per-row outputs and
d loss_i / d student_i by autograd.
"""
from __future__ import annotations

import torch

from smskd_fast.backends.base import LossOptions, RowInputs
from smskd_fast.backends.reference import ReferenceBackend
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.ops.schema import PER_ROW_OUTPUTS

FIELDS = PER_ROW_OUTPUTS


def make_inputs(n, c, k, dtype, *, seed=0, scale=3.0, temperature=4.0, with_target=True, with_reference=True):
    """Student and reference (dtype), target with one ignored row, and the top-k teacher (float32/64)."""
    g = torch.Generator().manual_seed(seed)
    student, teacher, reference = ((torch.randn(n, c, generator=g, dtype=torch.float64) * scale) for _ in range(3))
    target = torch.randint(0, c, (n,), generator=g)
    if n > 2:
        target[1] = -100
    cache_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    topk = TopKTeacher.from_logits(teacher.to(cache_dtype), target, k, temperature)
    return (student.to(dtype), target if with_target else None, topk,
            reference.to(dtype) if with_reference else None)


def no_rest_mass_case():
    """R = 0: every non-kept student logit is -inf (finite on the kept classes only), so the rest term is
    infinite; the target of each valid row is a kept class. Returns (student, target, topk, options)."""
    student, target, topk, _ = make_inputs(6, 300, 10, torch.float32, seed=9, temperature=2.0)
    rest = torch.ones_like(student, dtype=torch.bool).scatter(1, topk.indices, False)
    student[rest] = float("-inf")
    target = torch.where(target == -100, target, topk.indices[:, 0])
    options = LossOptions(temperature=2.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.0)
    return student, target, topk, options


def run_reference(student, target, topk, reference, options):
    """The float64 reference on the same values, with its gradient (d loss_i / d student_i) by autograd."""
    upcast = TopKTeacher(*(t.double() if t.is_floating_point() else t for t in
                           (topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
                            topk.log_sum_exp_at_temperature)))
    s = student.detach().double().clone().requires_grad_(True)  # never the caller's tensor itself
    out = ReferenceBackend().rows(RowInputs(s, target, None, None if reference is None else reference.double(),
                                            upcast), options)
    (grad,) = torch.autograd.grad(out.loss.sum(), s)
    return out, grad
