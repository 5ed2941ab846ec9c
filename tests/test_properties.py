"""Property-based agreement of every available CPU backend with the float64 reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smskd_fast
from tolerances import grad_tolerance, loss_tolerance

CPU_BACKENDS = [name for name, status in smskd_fast.available_backends().items()
                if status and name != "cuda" and name != "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def problems(draw):
    n = draw(st.integers(1, 6))
    c = draw(st.sampled_from([1, 2, 3, 7, 16, 33, 100, 257, 1031]))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 100.0] + ([] if dtype == torch.float16 else [1e4])))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    s, t, r = ((torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(3))
    y = torch.randint(0, c, (n,), generator=g)
    ignore = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    y[torch.tensor(ignore, dtype=torch.bool)] = -100
    if c > 2 and draw(st.booleans()):  # a masked vocabulary entry in all three models
        column = draw(st.integers(0, c - 1))
        for logits in (s, t, r):
            logits[:, column] = float("-inf")
        y[y == column] = (column + 1) % c
    present = draw(st.sampled_from(["both", "teacher", "none"]))
    options = dict(
        temperature=draw(st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0])),
        ce_weight=draw(st.sampled_from([0.0, 0.5, 1.0])),
        kd_weight=draw(st.sampled_from([0.0, 1.0, 2.0])),
        ref_weight=draw(st.sampled_from([0.0, 0.7, 1.0])),
        weighting=draw(st.sampled_from(["inverse_tcp", "tcp", "constant"])) if present != "none" else "constant",
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    teacher = t if present in ("both", "teacher") else None
    reference = r if present == "both" else None
    return s, y, teacher, reference, options


def run(backend, s, y, t, r, options):
    s = s.detach().clone().requires_grad_(True)
    out = smskd_fast.smskd_loss(s, y, t, r, backend=backend, **options)
    out.loss.sum().backward()
    return out, s.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_backend_agrees_with_float64_reference(backend, problem):
    s, y, t, r, options = problem
    out, grad = run(backend, s, y, t, r, options)
    upcast = [None if x is None else x.double() for x in (t, r)]
    want, want_grad = run("reference", s.double(), y, *upcast, options)
    finite = s[torch.isfinite(s)]
    max_abs = float(finite.abs().max()) if finite.numel() else 0.0
    T = options["temperature"]
    weights = options["ce_weight"] + options["kd_weight"] + options["ref_weight"]
    rtol, atol = loss_tolerance(max_abs, T, weights)
    rows = 1 if options["reduction"] != "sum" else s.shape[0]
    for key in ("loss", "ce", "kd", "ref"):
        torch.testing.assert_close(getattr(out, key).double(), getattr(want, key).detach(), rtol=rtol,
                                   atol=atol * rows, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(out.tcp.double(), want.tcp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.weight.double(), want.weight, rtol=1e-5, atol=1e-6)
    assert grad.dtype == s.dtype
    grad_scale = options["ce_weight"] + T * (options["kd_weight"] + options["ref_weight"]) + 1e-30
    _, grad_atol = grad_tolerance(s.dtype, max_abs, T, grad_scale)
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=grad_atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(1, 300), T=st.sampled_from([1.0, 2.0, 4.0]), seed=st.integers(0, 10**6),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_kd_loss_is_the_torch_functional_composition(backend, n, c, T, seed, reduction):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, c, generator=g, dtype=torch.float64), torch.randn(n, c, generator=g, dtype=torch.float64)
    per_row = T * T * torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                                 log_target=True, reduction="none").sum(-1)
    want = {"none": per_row, "sum": per_row.sum(), "mean": per_row.mean()}[reduction]
    got = smskd_fast.kd_loss(s.float(), t.float(), temperature=T, reduction=reduction, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=loss_tolerance(float(s.abs().max()), T, 1)[1] * n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher", "reference"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_give_what_the_reference_gives(backend, where, value):
    g = torch.Generator().manual_seed(0)
    s, t, r = (torch.randn(4, 9, generator=g) for _ in range(3))
    y = torch.tensor([1, 2, 3, 4])
    {"student": s, "teacher": t, "reference": r}[where][1, 5] = value
    out, grad = run(backend, s, y, t, r, dict(reduction="none", weighting="constant"))
    want, want_grad = run("reference", s.double(), y, t.double(), r.double(), dict(reduction="none",
                                                                                  weighting="constant"))
    for key in ("loss", "ce", "kd", "ref"):
        got_v, want_v = getattr(out, key).double(), getattr(want, key).detach()
        assert torch.equal(torch.isnan(got_v), torch.isnan(want_v)), (key, got_v, want_v)
        assert torch.equal(torch.isinf(got_v), torch.isinf(want_v)), (key, got_v, want_v)
        finite = torch.isfinite(want_v)
        torch.testing.assert_close(got_v[finite], want_v[finite], rtol=1e-5, atol=1e-5)
    # Gradients: every entry where the reference's is finite agrees (an infinite loss can
    # have a finite gradient, e.g. a -inf student logit where the teacher has mass); a row
    # where the reference's has a NaN or inf has one too, so that an inf/NaN check on the
    # gradients sees it. Which entries of such a row are non-finite depends on the
    # formula (autograd through log_softmax or the closed form) and is not compared.
    finite = torch.isfinite(want_grad)
    torch.testing.assert_close(grad.double()[finite], want_grad[finite], rtol=0, atol=1e-5)
    for row in torch.nonzero(~finite.all(dim=-1)).flatten():
        assert not torch.isfinite(grad[row]).all(), f"row {row}: the reference's gradient is not finite, ours is"
