"""The backends' eager calls of the functional loss ops (ops/registration.py call_functional_op).

Eagerly, with a student that needs its gradient, the backends run the op under
FunctionalOpUnderAutograd instead of torch.library's registered autograd, whose
per-call argument binding (torch._library.utils.fill_defaults) costs more host time
than the rest of the dispatch (benchmarks/host_overhead.py). Both must be the same
formula: the gradients here are compared bit for bit with the registered autograd of
the same op, for grad_output 1 (rows untouched), other values (rows scaled), per-row
weights, retained graphs, and the dense and top-k ops of the CPU and Triton backends.
A patched fill_defaults shows which path ran.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch._library import utils as library_utils
from torch.utils._python_dispatch import TorchDispatchMode

import smskd_fast
from smskd_fast.backends.base import LossOptions
from smskd_fast.ops import registration, schema
from smskd_fast.ops.extension import extension_loaded
from topk_cases import make_inputs as make_topk_inputs
from triton_interpreter import DEVICE, needs_kernels, reruns_under_interpreter, run_under_interpreter

OPTIONS = LossOptions(temperature=2.5, ce_weight=0.7, kd_weight=1.3, ref_weight=0.9)
needs_extension = pytest.mark.skipif(not extension_loaded(), reason="needs the compiled smskd_fast._C")
TRITON_CASES = pytest.param("triton", marks=needs_kernels)
CPU_CASES = pytest.param("cpu", marks=needs_extension)


def rows_case(topk: bool, dtype: torch.dtype, device: str):
    """The student (requiring grad), the op's tensor arguments after it, and the API's teacher keyword."""
    generator = torch.Generator().manual_seed(3)
    if topk:
        student, target, teacher, reference = make_topk_inputs(6, 40, 5, dtype, temperature=OPTIONS.temperature)
        student, target, reference = (x.to(device) for x in (student, target, reference))
        teacher = teacher.rows().map_tensors(lambda x: x.to(device))
        tensors = (target, *teacher.tensors(), reference)
        api_teacher = {"teacher_topk": teacher}
    else:
        student, teacher, reference = ((torch.randn(6, 40, generator=generator) * 3).to(dtype).to(device)
                                       for _ in range(3))
        target = torch.randint(0, 40, (6,), generator=generator).to(device)
        target[2] = OPTIONS.ignore_index
        tensors = (target, teacher, reference)
        api_teacher = {"teacher_logits": teacher}
    return student.requires_grad_(), tensors, api_teacher


def op_for(backend: str, topk: bool):
    name = (schema.TOPK if topk else schema.DENSE).name + ("_triton" if backend == "triton" else "")
    return getattr(torch.ops.smskd_fast, name)


def gradient(call, student, weights, grad_output, retain: bool):
    """d (grad_output * sum_i weights_i loss_i) / d student from call() -> per-row losses, and the second
    backward's when retain (the graph kept after the first)."""
    rows_loss = call()
    total = (rows_loss * weights).sum() * grad_output
    (first,) = torch.autograd.grad(total, student, retain_graph=retain)
    if not retain:
        return first, None
    (second,) = torch.autograd.grad(total, student)
    return first, second


@pytest.mark.parametrize("backend", [CPU_CASES, TRITON_CASES])
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad_output, row_weights, retain", [
    (1.0, False, False),  # the mean's loss.backward(): backward leaves the rows as written
    (0.37, False, False),  # rows scaled in place
    (1.0, True, False),  # a different factor per row
    (0.37, True, True),  # graph retained: scaled out of place, twice
])
def test_eager_path_is_the_registered_formula_bit_for_bit(backend, topk, dtype, grad_output, row_weights, retain):
    student, tensors, _ = rows_case(topk, dtype, DEVICE)
    op = op_for(backend, topk)
    scale = torch.tensor(1 / 5, dtype=torch.float32, device=DEVICE)
    arguments = (*tensors, *schema.scalar_arguments(OPTIONS), True, scale, "none")
    weights = torch.linspace(0.5, 1.5, 6, device=DEVICE) if row_weights else torch.ones(6, device=DEVICE)
    eager = gradient(lambda: registration.call_functional_op(op, student, *arguments)[0], student, weights,
                     grad_output, retain)
    registered = gradient(lambda: op(student, *arguments)[0], student, weights, grad_output, retain)
    for got, want in zip(eager, registered):
        if want is not None:
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The registered path itself is checked against float64 elsewhere (test_grad_scale*.py); here
    # only that it is not trivially zero, so that the bitwise agreement above says something.
    assert eager[0].abs().max() > 0


@pytest.mark.parametrize("backend", [CPU_CASES, TRITON_CASES])
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("grad_output, retain", [(1.0, False), (0.37, False), (0.37, True)])
def test_reducing_op_eager_path_is_the_registered_formula_bit_for_bit(backend, topk, reduction, grad_output, retain):
    """The op's own reduction: its 0-d loss differentiated eagerly equals the registered autograd's."""
    student, tensors, _ = rows_case(topk, torch.float32, DEVICE)
    op = op_for(backend, topk)
    arguments = (*tensors, *schema.scalar_arguments(OPTIONS), True, None, reduction)
    one = torch.ones((), device=DEVICE)
    eager = gradient(lambda: registration.call_functional_op(op, student, *arguments)[0], student, one,
                     grad_output, retain)
    registered = gradient(lambda: op(student, *arguments)[0], student, one, grad_output, retain)
    for got, want in zip(eager, registered):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert eager[0].abs().max() > 0


@pytest.mark.parametrize("backend", [CPU_CASES, TRITON_CASES])
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
def test_public_api_does_not_rebind_arguments_per_call(backend, topk, monkeypatch):
    """The API's differentiable call skips torch.library's fill_defaults; a direct op call goes through it
    (so the patch is where the registered autograd looks it up)."""
    student, tensors, api_teacher = rows_case(topk, torch.float32, DEVICE)
    calls = []
    original = library_utils.fill_defaults

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(library_utils, "fill_defaults", counting)
    out = smskd_fast.smskd_loss(student, tensors[0], reference_logits=tensors[-1], temperature=OPTIONS.temperature,
                                backend=backend, **api_teacher)
    out.loss.backward()
    assert calls == []
    assert student.grad is not None and student.grad.abs().max() > 0
    op_for(backend, topk)(student, *tensors, *schema.scalar_arguments(OPTIONS), True, None, "none")
    assert calls == [1]


@pytest.mark.parametrize("backend", [CPU_CASES, TRITON_CASES])
def test_only_the_loss_is_differentiable(backend):
    """The per-row terms other than the loss carry no autograd history, so reducing them records nothing."""
    student, tensors, _ = rows_case(False, torch.float32, DEVICE)
    out = smskd_fast.smskd_loss(student, tensors[0], tensors[1], tensors[2], backend=backend, reduction="none")
    assert out.loss.requires_grad and out.loss.grad_fn is not None
    for name in ("ce", "kd", "ref", "tcp", "weight"):
        assert not getattr(out, name).requires_grad, name
    outputs = registration.call_functional_op(op_for(backend, False), student, *tensors,
                                              *schema.scalar_arguments(OPTIONS), True, None, "none")
    assert [x.requires_grad for x in outputs] == [True] + [False] * 6


@pytest.mark.parametrize("backend", [CPU_CASES, TRITON_CASES])
def test_calls_without_a_gradient_use_the_op_itself(backend):
    """No student gradient wanted (no_grad, a detached student, compute_grad=False): no autograd node."""
    student, tensors, _ = rows_case(False, torch.float32, DEVICE)
    op = op_for(backend, False)
    scalars = schema.scalar_arguments(OPTIONS)
    with torch.no_grad():
        assert registration.call_functional_op(op, student, *tensors, *scalars, True, None, "none")[0].grad_fn is None
    assert registration.call_functional_op(op, student.detach(), *tensors, *scalars, True, None,
                                           "none")[0].grad_fn is None
    outputs = registration.call_functional_op(op, student.detach(), *tensors, *scalars, False, None, "none")
    assert outputs[-1].shape == (0, 40)


def triton_body(topk: bool):
    from smskd_fast.backends.triton import backend as triton_backend

    return triton_backend._eager_topk_rows if topk else triton_backend._eager_dense_rows


@needs_kernels
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_triton_body_called_past_the_dispatcher_equals_the_op_bit_for_bit(topk, dtype, reduction):
    """The Triton backend's plain eager calls run the op's body directly (call_functional_op's eager): every
    output and the gradient are the op's, bit for bit, and the body is what ran."""
    student, tensors, _ = rows_case(topk, dtype, DEVICE)
    op = op_for("triton", topk)
    arguments = (*tensors, *schema.scalar_arguments(OPTIONS), True, None, reduction)
    body = triton_body(topk)
    ran = []

    def spied(*args):
        ran.append(1)
        return body(*args)

    direct = registration.call_functional_op(op, student, *arguments, eager=spied)
    (direct_grad,) = torch.autograd.grad(direct[0].sum() * 0.37, student)
    assert ran == [1]
    through_op = registration.call_functional_op(op, student, *arguments)
    (op_grad,) = torch.autograd.grad(through_op[0].sum() * 0.37, student)
    assert ran == [1]
    for got, want in zip((*direct, direct_grad), (*through_op, op_grad)):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert direct_grad.abs().max() > 0


@needs_kernels
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_triton_calls_without_a_gradient_run_the_body_directly(topk, reduction):
    """Evaluation calls (grad mode off, a student that needs no gradient, inference mode) run the body past
    the dispatcher too, with the op's outputs bit for bit; a teacher that requires a gradient keeps the op,
    whose autograd records the call."""
    student, tensors, _ = rows_case(topk, torch.float32, DEVICE)
    op, body = op_for("triton", topk), triton_body(topk)
    ran = []

    def spied(*args):
        ran.append(1)
        return body(*args)

    for compute_grad in (True, False):
        arguments = (*tensors, *schema.scalar_arguments(OPTIONS), compute_grad, None, reduction)
        expected = op(student.detach(), *arguments)
        for context, argument in ((torch.no_grad(), student), (contextlib.nullcontext(), student.detach()),
                                  (torch.inference_mode(), student.detach())):
            with context:
                outputs = registration.call_functional_op(op, argument, *arguments, eager=spied)
            for got, want in zip(outputs, expected):
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert len(ran) == 6
    if not topk:
        teacher = tensors[1].detach().requires_grad_()
        outputs = registration.call_functional_op(op, student.detach(), tensors[0], teacher, *tensors[2:],
                                                  *schema.scalar_arguments(OPTIONS), False, None, reduction,
                                                  eager=spied)
        assert len(ran) == 6 and outputs[0].grad_fn is not None


class OperationNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@needs_kernels
def test_triton_api_runs_the_body_directly_only_in_plain_eager(monkeypatch):
    """A dispatch mode (fake tensors, functionalization, operation counters) or a function mode
    (torch.device(...)) sees the op itself; only a plain eager call runs its body past the dispatcher."""
    from smskd_fast.backends.triton import backend as triton_backend

    student, tensors, _ = rows_case(False, torch.float32, DEVICE)
    ran = []
    body = triton_backend._eager_dense_rows
    monkeypatch.setattr(triton_backend, "_eager_dense_rows", lambda *args: ran.append(1) or body(*args))

    def loss():
        return smskd_fast.smskd_loss(student, tensors[0], tensors[1], tensors[2], backend="triton").loss

    loss().backward()
    assert ran == [1]
    with torch.no_grad():  # an evaluation call (no gradient) takes it too
        loss()
    assert ran == [1, 1]
    ran.clear()
    with torch.device(DEVICE):
        loss().backward()
    with OperationNames() as mode:
        loss().backward()
    assert ran == []
    assert "smskd_fast::smskd_loss_rows_triton" in mode.names
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        loss().backward()
    assert ran == []


@needs_kernels
def test_triton_api_top_k_runs_its_body_directly(monkeypatch):
    from smskd_fast.backends.triton import backend as triton_backend

    student, tensors, api_teacher = rows_case(True, torch.float32, DEVICE)
    ran = []
    body = triton_backend._eager_topk_rows
    monkeypatch.setattr(triton_backend, "_eager_topk_rows", lambda *args: ran.append(1) or body(*args))
    out = smskd_fast.smskd_loss(student, tensors[0], reference_logits=tensors[-1], backend="triton",
                                temperature=OPTIONS.temperature, **api_teacher)
    out.loss.backward()
    assert ran == [1] and student.grad.abs().max() > 0


@needs_kernels
def test_triton_api_under_jit_trace_and_tensor_subclasses_uses_the_op():
    """torch.jit.trace records tensors for the body's shapes (the op is one traced node); a subclass must
    reach the op's dispatch: neither may run the body directly."""
    from torch.testing._internal.two_tensor import TwoTensor

    student, tensors, _ = rows_case(False, torch.float32, DEVICE)

    def loss(s):
        return smskd_fast.smskd_loss(s, tensors[0], tensors[1], tensors[2], backend="triton").loss

    expected = loss(student)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the API's shape checks, traced as constants
        traced = torch.jit.trace(loss, (student,), check_trace=False)
    torch.testing.assert_close(traced(student), expected, rtol=0, atol=0)
    assert not registration.plain_eager_call((TwoTensor(student.detach(), student.detach()),))


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file's Triton cases under TRITON_INTERPRET=1 in a fresh interpreter (tests/triton_interpreter.py)."""
    run_under_interpreter(__file__, "-k", "triton")

