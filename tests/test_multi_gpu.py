"""Logits on a CUDA device that is not the current one: every GPU backend computes on the logits' device.

Triton launches on the current device (and its current stream); the Triton launchers switch to the
logits' device (smskd_fast/ops/launch_device.py), the compiled CUDA ops take a device guard. The GPU cases run
the loss on cuda:1 while cuda:0 is current and compare it with the same call on cuda:0 (same kernels,
same configuration: equal bit for bit); they need two GPUs and are skipped with fewer. The switch's
decision itself is checked everywhere, with the device count and the current device stubbed, and that
every Triton launcher enters it (under the interpreter, with a spy).
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

import smskd_fast
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.ops import launch_device
from smskd_fast.ops.launch_device import on_device_of
from smskd_fast.ops.scale_rows import scale_rows_
from triton_interpreter import DEVICE, needs_kernels, reruns_under_interpreter, run_under_interpreter



def stub_cuda(monkeypatch, count: int, current: int) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def on(device: str):
    return SimpleNamespace(device=torch.device(device))


@pytest.mark.parametrize("device, count, current, switches_to", [
    ("cuda:1", 2, 0, 1),    # the case the switch exists for
    ("cuda:0", 2, 1, 0),
    ("cuda:1", 2, 1, None),  # already current
    ("cuda:0", 1, 0, None),  # one GPU: nothing to switch to
    ("cpu", 2, 0, None),     # the interpreter's CPU tensors
])
def test_launches_switch_to_the_logits_device(monkeypatch, device, count, current, switches_to):
    stub_cuda(monkeypatch, count, current)
    monkeypatch.setattr(launch_device, "_REAL_TENSOR_TYPES", (SimpleNamespace,))  # a tensor on `device`
    context = on_device_of(on(device))
    if switches_to is None:
        assert isinstance(context, contextlib.nullcontext)
    else:
        assert isinstance(context, torch.cuda.device) and context.idx == switches_to


def test_no_switch_while_tracing(monkeypatch):
    """A fake tensor's launch is recorded, not run, and its device need not exist on this machine."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    stub_cuda(monkeypatch, 2, 0)
    with FakeTensorMode():
        fake = torch.empty(2, 3, device="cuda:1")
    assert fake.device == torch.device("cuda:1")
    assert isinstance(on_device_of(fake), contextlib.nullcontext)


@needs_kernels
def test_every_triton_launcher_enters_the_switch(monkeypatch):
    """The dense and top-k launchers (through the API, forward and backward) and backward's row scaling
    each enter on_device_of with the tensor they launch on."""
    from smskd_fast.backends.triton import launch, topk_launch
    from smskd_fast.ops import scale_rows

    entered = []

    def spy(tensor):
        entered.append(module_name)
        return contextlib.nullcontext()

    for module in (launch, topk_launch, scale_rows):
        monkeypatch.setattr(module, "on_device_of", spy)
    generator = torch.Generator().manual_seed(2)
    student, teacher = (torch.randn(4, 40, generator=generator).to(DEVICE) for _ in range(2))
    target = torch.randint(0, 40, (4,), generator=generator).to(DEVICE)
    leaf = student.requires_grad_()
    for module_name, teacher_args in (("launch", {"teacher_logits": teacher}),
                                      ("topk_launch", {"teacher_topk": TopKTeacher.from_logits(teacher, target, k=5,
                                                                                                temperature=2.0)})):
        smskd_fast.smskd_loss(leaf, target, temperature=2.0, backend="triton", **teacher_args).loss.backward()
        assert entered == [module_name]
        entered.clear()
    module_name = "scale_rows"
    scale_rows.launch_scale_rows(torch.ones(4, 40, device=DEVICE), torch.full((4,), 0.5, device=DEVICE))
    assert entered == ["scale_rows"]


TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
GPU_BACKENDS = [name for name in ("cuda", "triton") if smskd_fast.available_backends()[name]]


def loss_and_grad(backend: str, device: str, topk: bool, overwrite: bool):
    """The mean SMSKD loss, its terms and the student's gradient, computed on device, returned on the CPU."""
    generator = torch.Generator().manual_seed(0)
    n, c = 37, 5000  # the online kernels (C > 4096) and the top-k column blocks

    def logits():
        return (3 * torch.randn(n, c, generator=generator)).to(torch.bfloat16).to(device)

    student, teacher, reference = logits(), logits(), logits()
    target = torch.randint(0, c, (n,), generator=generator).to(device)
    target[::7] = -100
    teacher_topk = TopKTeacher.from_logits(teacher, target, k=16, temperature=2.0) if topk else None
    leaf = student.clone().requires_grad_(True)
    out = smskd_fast.smskd_loss(leaf.clone() if overwrite else leaf, target, None if topk else teacher, reference,
                                temperature=2.0, backend=backend, overwrite_student_logits=overwrite,
                                teacher_topk=teacher_topk)
    out.loss.backward()
    torch.cuda.synchronize(device)
    return [value.detach().cpu() for value in (out.loss, out.ce, out.kd, out.ref, leaf.grad)]


@pytest.mark.gpu
@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["functional", "overwrite"])
def test_logits_on_a_device_that_is_not_current(backend, topk, overwrite):
    with torch.cuda.device(0):
        expected = loss_and_grad(backend, "cuda:0", topk, overwrite)
        computed = loss_and_grad(backend, "cuda:1", topk, overwrite)
        assert torch.cuda.current_device() == 0  # the switch was undone
    for name, value, want in zip(("loss", "ce", "kd", "ref", "grad"), computed, expected):
        assert torch.equal(value, want), name


@pytest.mark.gpu
@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")
@pytest.mark.parametrize("per_row", [True, False], ids=["factor_per_row", "one_factor"])
def test_backward_scaling_on_a_device_that_is_not_current(per_row):
    """scale_rows_ (backward's Triton step) on cuda:1 with cuda:0 current: as the in-place multiply."""
    grad = torch.randn(300, 5000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to("cuda:1")
    if per_row:
        factor = torch.linspace(0.5, 1.5, 300, device="cuda:1")
        factor[::3] = 1.0  # rows the kernel leaves unread
    else:
        factor = torch.tensor(0.25, device="cuda:1")
    expected = (grad.float() * (factor[:, None] if per_row else factor)).to(torch.bfloat16)
    with torch.cuda.device(0):
        scale_rows_(grad, factor)
        torch.cuda.synchronize("cuda:1")
    assert torch.equal(grad, expected)


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file's Triton cases under TRITON_INTERPRET=1 in a fresh interpreter (tests/triton_interpreter.py)."""
    run_under_interpreter(__file__, "-k", "launcher")
