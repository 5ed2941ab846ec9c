"""fused_linear_smskd_loss under autograd, where its gradients come from forward.

- The upstream gradient's factor (GradScaler's 65536, 1/3 for gradient accumulation) scales fp16 and
  bf16 gradients with one rounding: the oracle is the unscaled gradient times the factor in float64
  (the unscaled gradient is checked against the float64 composition in tests/test_fused_linear.py).
- Under torch.no_grad and torch.inference_mode the loss is that of grad mode and no gradient is
  computed: counted as matrix products (three heads: one projection per head per chunk; gradients
  would add two more per chunk).
- Inputs modified in place after forward are refused by autograd where backward re-reads them.
- Double backward is refused on every backend, with a message that says so.
"""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from smskd_fast.loss.fused_linear import fused_linear_smskd_loss
from smskd_fast.ops.extension import extension_loaded
from triton_interpreter import DEVICE, needs_kernels, reruns_under_interpreter, run_under_interpreter

BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not extension_loaded() or DEVICE != "cpu",
                                                         reason="needs the compiled smskd_fast._C and CPU tensors")),
            pytest.param("triton", marks=needs_kernels), "reference"]
MATMULS = {"linear", "mm", "addmm", "addmm_", "matmul"}


def problem(dtype, rows=64, hidden=16, vocab=50, seed=0):
    """Student hidden states and head (requiring grad), a teacher and a reference as hidden states and heads."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    target = torch.randint(0, vocab, (rows,), generator=g)
    target[::5] = -100
    return dict(student_hidden=randn(rows, hidden).requires_grad_(),
                student_head_weight=randn(vocab, hidden, scale=0.3).requires_grad_(),
                target=target.to(DEVICE),
                teacher_hidden=randn(rows, 8), teacher_head_weight=randn(vocab, 8, scale=0.3),
                reference_hidden=randn(rows, hidden), reference_head_weight=randn(vocab, hidden, scale=0.3))


def student_grads(p, loss, **kwargs):
    return torch.autograd.grad(loss, (p["student_hidden"], p["student_head_weight"]), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_mean_scaled_by_65536_gives_finite_gradients_65536_times_the_unscaled(backend):
    """GradScaler's default scale, 2^16, is inf in fp16: the gradient times 2^16 (exact, a power of two)."""
    p = problem(torch.float16)
    unscaled = student_grads(p, fused_linear_smskd_loss(**p, chunk_size=16, backend=backend).loss)
    scaled = student_grads(p, fused_linear_smskd_loss(**p, chunk_size=16, backend=backend).loss * 65536.0)
    for got, want in zip(scaled, unscaled):
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        assert torch.equal(got.double(), want.double() * 65536.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("factor", [1 / 3, 1 / 7])
def test_bf16_gradient_scaled_by_a_factor_is_rounded_once(backend, reduction, factor):
    """bf16(1/3) is 0.2% above 1/3: each entry must be within one bf16 rounding (2^-8 relative, plus the
    float32 factor's 2^-22) of the unscaled gradient times the factor in float64, with no systematic skew
    (least-squares ratio within 2^-12 of 1; bf16(1/3) gave 1 + 2^-9)."""
    p = problem(torch.bfloat16, rows=128, hidden=32, vocab=96, seed=1)
    options = dict(chunk_size=32, backend=backend, reduction=reduction)
    unscaled = student_grads(p, fused_linear_smskd_loss(**p, **options).loss)
    scaled = student_grads(p, fused_linear_smskd_loss(**p, **options).loss * factor)
    for got, one in zip(scaled, unscaled):
        want = one.double() * factor
        assert torch.all((got.double() - want).abs() <= (2.0 ** -8 + 2.0 ** -22) * want.abs())
        ratio = (got.double() * want).sum() / (want * want).sum()
        assert abs(ratio.item() - 1) < 2.0 ** -12, f"systematic skew {ratio.item() - 1:.2e}"


class MatmulCounter(TorchFunctionMode):
    """Counts the matrix products called while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", None) in MATMULS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_without_grad_mode_the_loss_is_computed_and_no_gradient(backend, mode, reduction):
    p = problem(torch.float32)
    want = fused_linear_smskd_loss(**p, chunk_size=16, backend=backend, reduction=reduction)
    with mode(), MatmulCounter() as counter:
        got = fused_linear_smskd_loss(**p, chunk_size=16, backend=backend, reduction=reduction)
    assert got.loss.grad_fn is None and not got.loss.requires_grad
    for key in ("loss", "ce", "kd", "ref", "tcp", "weight"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key).detach(), rtol=0, atol=0)
    assert counter.count == 3 * 4  # three heads' projections, four chunks of 16 rows, no gradient product


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modified", ["student_head_weight", "student_hidden", "teacher_hidden"])
def test_an_input_modified_in_place_after_forward_is_refused_where_backward_reads_it(backend, modified):
    p = problem(torch.float32)
    per_row = fused_linear_smskd_loss(**p, chunk_size=16, backend=backend, reduction="none").loss
    mean = fused_linear_smskd_loss(**p, chunk_size=16, backend=backend).loss
    first = student_grads(p, mean, retain_graph=True)  # from forward: nothing re-read, no error
    with torch.no_grad():
        p[modified].mul_(2)
    for loss in (per_row.sum(), mean):  # "none" recomputes in backward, as a second backward does
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            student_grads(p, loss)
    assert all(torch.isfinite(g).all() for g in first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused_on_every_backend_with_what_to_use(backend):
    p = problem(torch.float32)
    loss = fused_linear_smskd_loss(**p, chunk_size=16, backend=backend).loss
    with pytest.raises(NotImplementedError, match=r"on every backend \(backend='reference' included\).*"
                                                  r"create_graph=True.*smskd_loss\(\.\.\., backend='reference'\)"):
        student_grads(p, loss, create_graph=True)


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file's Triton cases under TRITON_INTERPRET=1 in a fresh interpreter (tests/triton_interpreter.py)."""
    run_under_interpreter(__file__, "-k", "triton")
