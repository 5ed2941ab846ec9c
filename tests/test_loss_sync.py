"""On a GPU the loss's forward and backward never make the host wait, so a call can be captured in a CUDA graph.

At small C a call is bound by the host's work per call (benchmarks/host_overhead.py), and
capturing the training step in a CUDA graph removes that work; both need a call without
host synchronisation: the mean's 1/n is counted on the device, targets are checked by the
kernels, and backward's row scaling reads its factors on the device (ops/scale_rows.py).
torch.cuda.set_sync_debug_mode("error") turns any synchronisation into an error; the
captured graph, replayed on new values, must give what an eager call gives. Skipped
without a CUDA device; run by benchmarks/gpu/run_all.sh.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import smskd_fast
from smskd_fast.backends.topk import TopKTeacher

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(not smskd_fast.available_backends()[name],
                                                         reason=f"{name} backend unavailable"))
            for name in ("cuda", "triton")]


def problem(n: int, c: int, dtype: torch.dtype, topk: bool, seed: int = 0):
    """Student (requires grad), target with ignored rows, and the teacher keyword (dense or top-k), reference."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    student, teacher, reference = ((3 * torch.randn(n, c, generator=generator, device="cuda")).to(dtype)
                                   for _ in range(3))
    target = torch.randint(0, c, (n,), generator=generator, device="cuda")
    target[1::7] = -100
    teacher_kw = ({"teacher_topk": TopKTeacher.from_logits(teacher.float(), target, 16, 2.0)} if topk
                  else {"teacher_logits": teacher})
    return student.requires_grad_(), target, teacher_kw, reference


@contextlib.contextmanager
def sync_is_an_error():
    """torch.cuda.set_sync_debug_mode("error") for the block (also used by test_fused_linear_sync.py)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("overwrite", [False, True], ids=["new_buffer", "overwrite"])
def test_forward_and_backward_do_not_synchronise(backend, topk, dtype, overwrite):
    student, target, teacher_kw, reference = problem(64, 1000, dtype, topk)

    def call(reduction: str, grad_output: float):
        s = student.detach().clone().requires_grad_()
        out = smskd_fast.smskd_loss(s, target, reference_logits=reference, temperature=2.0, reduction=reduction,
                                    backend=backend, overwrite_student_logits=overwrite, **teacher_kw)
        loss = out.loss if reduction != "none" else out.loss.sum()
        (loss * grad_output).backward()
        return s.grad

    for reduction in ("mean", "sum", "none"):
        for grad_output in (1.0, 0.5):  # rows left alone, rows scaled
            call(reduction, grad_output)  # warm-up: Triton compiles on its first launch
            torch.cuda.synchronize()
            with sync_is_an_error():
                grad = call(reduction, grad_output)
            torch.cuda.synchronize()
            assert torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
def test_a_captured_call_replays_like_an_eager_one(backend, topk):
    """fwd + backward of the mean loss captured in a CUDA graph; replayed on new student logits it gives the
    eager call's loss and gradient, bit for bit (the same kernels on the same values)."""
    student, target, teacher_kw, reference = problem(48, 700, torch.bfloat16, topk)
    static_student = student.detach().clone().requires_grad_()

    def step():
        out = smskd_fast.smskd_loss(static_student, target, reference_logits=reference, temperature=2.0,
                                    backend=backend, **teacher_kw)
        (grad,) = torch.autograd.grad(out.loss, static_student)
        return out.loss.detach(), grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step()

    fresh, _, _, _ = problem(48, 700, torch.bfloat16, topk, seed=1)
    with torch.no_grad():
        static_student.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    eager_student = fresh.detach().clone().requires_grad_()
    out = smskd_fast.smskd_loss(eager_student, target, reference_logits=reference, temperature=2.0,
                                backend=backend, **teacher_kw)
    (eager_grad,) = torch.autograd.grad(out.loss, eager_student)
    torch.testing.assert_close(static_loss, out.loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(static_grad, eager_grad, rtol=0, atol=0)
