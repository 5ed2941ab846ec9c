"""Property-based agreement of every available CPU backend with the float64 reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smskd_fast
from tolerances import grad_tolerance, linear_grad_reach, linear_logit_bound, loss_tolerance

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
    rtol, atol = loss_tolerance(max_abs, T, weights, s.shape[-1])
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
@pytest.mark.parametrize("seed", range(8))
def test_small_logits_at_high_temperature(backend, seed):
    """KD and reference terms whose error is the log-sum-exps' rounding times T^2, not the logits' size
    (the case hypothesis found: |x| <= 0.3, T = 8, C = 100; see tolerances.loss_tolerance)."""
    g = torch.Generator().manual_seed(seed)
    s, t, r = ((torch.randn(4, 100, generator=g, dtype=torch.float64) * 0.1).float() for _ in range(3))
    y = torch.randint(0, 100, (4,), generator=g)
    out, _ = run(backend, s, y, t, r, dict(temperature=8.0, reduction="none"))
    want, _ = run("reference", s.double(), y, t.double(), r.double(), dict(temperature=8.0, reduction="none"))
    rtol, atol = loss_tolerance(float(s.abs().max()), 8.0, 3.0, 100)
    for key in ("kd", "ref"):
        torch.testing.assert_close(getattr(out, key).double(), getattr(want, key).detach(), rtol=rtol, atol=atol)


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
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=loss_tolerance(float(s.abs().max()), T, 1, c)[1] * n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), hidden=st.integers(1, 9), vocab=st.sampled_from([1, 2, 5, 33, 130]),
       chunk=st.integers(1, 13), bias=st.booleans(), seed=st.integers(0, 2**31 - 1),
       T=st.sampled_from([1.0, 4.0]), weighting=st.sampled_from(["inverse_tcp", "tcp", "constant"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_fused_linear_agrees_with_float64_logits_then_reference(backend, rows, hidden, vocab, chunk, bias, seed, T,
                                                                weighting, reduction, scale):
    """fused_linear_smskd_loss in float32, chunk by chunk, against the same values upcast to float64,
    logits materialised and the reference backend: loss terms and the gradients of hidden states,
    head weight and bias."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):  # float32 values; the reference sees them exactly, upcast
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).float()

    h, w, b = randn(rows, hidden), randn(vocab, hidden), randn(vocab) if bias else None
    th, tw, rh, rw = randn(rows, hidden), randn(vocab, hidden), randn(rows, hidden), randn(vocab, hidden)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[torch.rand(rows, generator=g) < 0.25] = -100
    options = dict(temperature=T, ce_weight=0.5, kd_weight=1.0, ref_weight=1.0, weighting=weighting,
                   reduction=reduction)

    def leaves(dtype):
        return [x.to(dtype).requires_grad_(True) if x is not None else None for x in (h, w, b)]

    got_leaves = leaves(torch.float32)
    got = smskd_fast.fused_linear_smskd_loss(got_leaves[0], got_leaves[1], y, th, tw, None, rh, rw,
                                             student_head_bias=got_leaves[2], backend=backend, chunk_size=chunk,
                                             **options)
    want_leaves = leaves(torch.float64)
    logits = torch.nn.functional.linear(want_leaves[0], want_leaves[1], want_leaves[2])
    want = smskd_fast.smskd_loss(logits, y, th.double() @ tw.double().T, rh.double() @ rw.double().T,
                                 backend="reference", **options)
    bound = linear_logit_bound(hidden, scale_of(h, th, rh), scale_of(w, tw, rw), 0.0 if b is None else scale_of(b))
    rtol, atol = loss_tolerance(bound, T, 2.5, vocab)
    n = 1 if reduction != "sum" else rows
    for key in ("loss", "ce", "kd", "ref"):
        torch.testing.assert_close(getattr(got, key).double(), getattr(want, key).detach(), rtol=rtol, atol=atol * n,
                                   msg=lambda m: f"{key}: {m}")
    present = [i for i, x in enumerate(got_leaves) if x is not None]
    got_grads = torch.autograd.grad(got.loss.sum(), [got_leaves[i] for i in present])
    want_grads = torch.autograd.grad(want.loss.sum(), [want_leaves[i] for i in present])
    _, logit_grad_atol = grad_tolerance(torch.float32, bound, T, 0.5 + T * 2.0)
    reach = linear_grad_reach(rows, vocab, scale_of(h), scale_of(w))
    for index, got_grad, want_grad in zip(present, got_grads, want_grads):
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=0, atol=logit_grad_atol * reach[index],
                                   msg=lambda m: f"gradient of {['hidden', 'weight', 'bias'][index]}: {m}")


def scale_of(*tensors):
    return max(float(x.detach().abs().max()) if x.numel() else 0.0 for x in tensors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("teacher_form", ["dense", "topk"])
@pytest.mark.parametrize("far", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("layout", ["outliers", "shifted quarter"])
@pytest.mark.parametrize("shape", [(4, 1000), (1, 9000)], ids=["rows", "row split over columns"])
def test_far_out_logits_keep_kd_and_reference_term_to_float32_rounding(two_threads, backend, teacher_form, far,
                                                                       layout, shape):
    """Far-out logits: "outliers", a teacher logit `far` up at column 7 and a reference one at C - 5, the student
    up with the teacher on half of the rows and with the reference on the others (a lone row: its maximum in
    the last part of the split, the teacher's in the first); "shifted quarter", the last quarter of every row of
    the student, the reference and a dense teacher `far` up. The KD and reference terms as exact as float32 holds the result, as PyTorch's own fp32
    composition is; the kernels summed p * (t - s), rounded to the spacing of `far` (2.5e-3 at 1e4), and the
    split row's merge once took a correction of the shifts' gap back (6% at 1e6)."""
    n, c = shape
    g = torch.Generator().manual_seed(int(far) + n)
    s, t, r = (torch.randn(n, c, generator=g) * 3 for _ in range(3))
    if layout == "outliers":
        t[:, 7], r[:, c - 5] = far, far
        s[: n // 2, 7] = far - 4.0
        s[n // 2:, c - 5] = far - 4.0
    else:  # (a top-k cache stores absolute values and log-sum-exps: a teacher shifted far is its own matter)
        for x in (s, r) if teacher_form == "topk" else (s, t, r):
            x[:, 3 * c // 4:] += far  # (a split row: all in its last part)
    y = torch.randint(0, c, (n,), generator=g)
    options = dict(reduction="none", weighting="constant", temperature=4.0)
    teacher = t
    if teacher_form == "topk":
        options["teacher_topk"], teacher = smskd_fast.TopKTeacher.from_logits(t.double(), y, 20, 4.0), None
    got = smskd_fast.smskd_loss(s, y, teacher, r, backend=backend, **options)
    want = smskd_fast.smskd_loss(s.double(), y, None if teacher is None else t.double(), r.double(),
                                 backend="reference", **options)
    for name in ("kd", "ref"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name), rtol=2e-6, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
