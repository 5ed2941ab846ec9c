"""fused_linear_smskd_loss's chunk loop never makes the host wait for the device.

On the CPU a TorchFunctionMode records every call that would block the host on a
GPU (.item(), .tolist(), bool/int/float of a tensor, nonzero and the other ops of
data-dependent shape, boolean-mask indexing) plus torch.cuda.synchronize, while
_chunk_pass (the loop, in forward and in the backward replay) and the autograd
backward run. The argument checks before the loop may synchronise (they read the
targets' range once per call) and the counter sees them there, which shows it
works. On a GPU, torch.cuda.set_sync_debug_mode("error") turns any synchronisation
in the same places into an error.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

import smskd_fast.loss.fused_linear as fused_linear_module
from smskd_fast.loss.fused_linear import fused_linear_smskd_loss
from smskd_fast.backends.topk import TopKTeacher
from test_loss_sync import sync_is_an_error

SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "nonzero", "argwhere",
           "masked_select", "unique", "unique_consecutive", "bincount", "repeat_interleave", "numpy", "cpu",
           "_local_scalar_dense", "equal", "allclose", "is_nonzero", "masked_scatter"}


def _boolean_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in items)


class SyncCounter(TorchFunctionMode):
    """Records the names of host-synchronising calls made while it is active."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCING or (name in ("__getitem__", "__setitem__", "index_put_", "index_put")
                               and len(args) > 1 and _boolean_index(args[1])):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recorded_in_loop(monkeypatch, guard):
    """Runs _chunk_pass and _FusedLinearSMSKD.backward under guard(); yields nothing."""
    chunk_pass, backward = fused_linear_module._chunk_pass, fused_linear_module._FusedLinearSMSKD.backward

    def guarded_chunk_pass(*args, **kwargs):
        with guard():
            return chunk_pass(*args, **kwargs)

    def guarded_backward(ctx, *grads):
        with guard():
            return backward(ctx, *grads)

    monkeypatch.setattr(fused_linear_module, "_chunk_pass", guarded_chunk_pass)
    monkeypatch.setattr(fused_linear_module._FusedLinearSMSKD, "backward", staticmethod(guarded_backward))
    yield


def problem(device, dtype, teacher_form, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, hidden, vocab = 40, 16, 300
    student_hidden = torch.randn(rows, hidden, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=g) * 0.3).to(device, dtype).requires_grad_()
    bias = torch.randn(vocab, generator=g).to(device, dtype).requires_grad_()
    teacher_hidden = torch.randn(rows, hidden, generator=g).to(device, dtype)
    teacher_weight = (torch.randn(vocab, hidden, generator=g) * 0.3).to(device, dtype)
    target = torch.randint(0, vocab, (rows,), generator=g).to(device)
    target[::5] = -100
    inputs = dict(student_hidden=student_hidden, student_head_weight=weight, target=target,
                  reference_hidden=torch.randn(rows, hidden, generator=g).to(device, dtype),
                  reference_head_weight=(torch.randn(vocab, hidden, generator=g) * 0.3).to(device, dtype),
                  student_head_bias=bias, temperature=2.0, chunk_size=7)
    if teacher_form == "dense":
        inputs.update(teacher_hidden=teacher_hidden, teacher_head_weight=teacher_weight)
    else:
        logits = torch.nn.functional.linear(teacher_hidden, teacher_weight)
        inputs["teacher_topk"] = TopKTeacher.from_logits(logits, target, 8, 2.0)
    return inputs, (student_hidden, weight, bias)


def run(inputs, leaves, reduction, backend):
    out = fused_linear_smskd_loss(**inputs, backend=backend, reduction=reduction)
    upstream = torch.rand_like(out.loss) if reduction == "none" else torch.tensor(0.5, device=out.loss.device)
    grads = torch.autograd.grad((out.loss * upstream).sum(), leaves)
    return out, grads


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("teacher_form", ["dense", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_chunk_loop_makes_no_synchronising_call(monkeypatch, backend, teacher_form, reduction):
    inside, whole = [], []
    synchronize_calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: synchronize_calls.append(args))
    inputs, leaves = problem("cpu", torch.float32, teacher_form)
    with recorded_in_loop(monkeypatch, lambda: SyncCounter(inside)):
        with SyncCounter(whole):
            out, grads = run(inputs, leaves, reduction, backend)
    assert inside == [] and synchronize_calls == []
    assert whole, "the counter saw nothing: the argument checks before the loop do synchronise"
    assert all(torch.isfinite(g).all() for g in grads)


def test_the_counter_sees_what_it_should():
    calls = []
    x = torch.arange(6.0)
    with SyncCounter(calls):
        x.sum().item()
        x[x > 2]
        torch.nonzero(x)
        if x[1] > 0:
            pass
        x.tolist()
        x[torch.tensor([0, 1])]  # an integer index: no synchronisation
    assert calls == ["item", "__getitem__", "nonzero", "__bool__", "tolist"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host synchronisation is a GPU notion)")
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("teacher_form", ["dense", "topk"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_chunk_loop_does_not_synchronise_on_cuda(monkeypatch, backend, teacher_form, dtype):
    """torch.cuda.set_sync_debug_mode("error") inside the loop, forward and backward, after a warm-up
    (Triton compiles, and may benchmark, on its first launch)."""
    for reduction in ("mean", "none"):
        inputs, leaves = problem("cuda", dtype, teacher_form)
        run(inputs, leaves, reduction, backend)  # warm-up
        torch.cuda.synchronize()
        with recorded_in_loop(monkeypatch, sync_is_an_error):
            out, grads = run(inputs, leaves, reduction, backend)
        torch.cuda.synchronize()
        assert all(torch.isfinite(g.float()).all() for g in grads)
