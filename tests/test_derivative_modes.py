"""Derivatives other than reverse-mode autograd (smskd_fast/loss/derivative_modes.py).

The fused backends give d loss / d student to loss.backward() only. Forward-mode AD (torch.func.jvp,
torch.autograd.forward_ad) used to get no tangent from them (a silent zero) and torch.func.grad failed
inside autograd.Function: now a fused backend named explicitly refuses both with an error that says so,
and "auto" runs the reference. The oracle for the values "auto" then gives is the fused backend's own
reverse-mode gradient (loss.backward()): jvp = <gradient, tangent>, torch.func.grad = the gradient.
torch.func.vmap runs the fused backends through their ops (never the Triton body past the dispatcher,
whose kernels cannot read vmap's batched tensors) and equals the loss of each sample.
fused_linear_smskd_loss (an autograd.Function computing its gradients in forward, on every backend)
refuses every transform and forward-mode tangent with an error that says so. Double backward
(create_graph=True) through a fused backend's gradient, a constant to autograd, used to give a silently
incomplete second derivative (or an error about tensors that do not require grad): it is refused.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import smskd_fast
from smskd_fast.loss.fused_linear import fused_linear_smskd_loss
from smskd_fast.ops.extension import extension_loaded
from triton_interpreter import DEVICE, needs_kernels, reruns_under_interpreter, run_under_interpreter

FUSED = [pytest.param("cpu", marks=pytest.mark.skipif(not extension_loaded() or DEVICE != "cpu",
                                                      reason="needs the compiled smskd_fast._C and CPU tensors")),
         pytest.param("triton", marks=needs_kernels)]
TOLERANCE = dict(rtol=2e-5, atol=2e-6)


def case():
    generator = torch.Generator().manual_seed(5)
    student, teacher, reference, tangent = (torch.randn(6, 33, generator=generator).to(DEVICE) * 2 for _ in range(4))
    target = torch.randint(0, 33, (6,), generator=generator).to(DEVICE)
    target[1] = -100
    return student, target, teacher, reference, tangent


def loss_of(backend, target, teacher, reference):
    return lambda student: smskd_fast.smskd_loss(student, target, teacher, reference, temperature=2.0,
                                                 backend=backend).loss


def backward_gradient(backend, student, target, teacher, reference):
    """d loss / d student by loss.backward() through backend: the reverse mode every backend supports."""
    leaf = student.clone().requires_grad_()
    loss_of(backend, target, teacher, reference)(leaf).backward()
    return leaf.grad


@pytest.mark.parametrize("backend", FUSED)
def test_a_fused_backend_refuses_forward_mode_and_func_grad(backend):
    student, target, teacher, reference, tangent = case()
    loss = loss_of(backend, target, teacher, reference)
    forward_mode = f"backend='{backend}' does not support forward-mode AD"
    with pytest.raises(NotImplementedError, match=forward_mode):
        torch.func.jvp(loss, (student,), (tangent,))
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=forward_mode):
        loss(forward_ad.make_dual(student, tangent))
    with pytest.raises(NotImplementedError, match=f"backend='{backend}' does not support torch.func's reverse mode"):
        torch.func.grad(loss)(student)
    with pytest.raises(NotImplementedError, match="kd_loss: backend"):
        torch.func.jvp(lambda s: smskd_fast.kd_loss(s, teacher, backend=backend), (student,), (tangent,))


@pytest.mark.parametrize("backend", FUSED)
def test_auto_runs_the_reference_for_them_with_the_fused_backends_gradient(backend):
    """Named backends are compared as the oracle: jvp and torch.func.grad through "auto" against the
    fused backend's loss.backward() gradient."""
    student, target, teacher, reference, tangent = case()
    auto = loss_of("auto", target, teacher, reference)
    gradient = backward_gradient(backend, student, target, teacher, reference)
    assert gradient.abs().max() > 0
    value, derivative = torch.func.jvp(auto, (student,), (tangent,))
    torch.testing.assert_close(derivative, (gradient * tangent).sum(), **TOLERANCE)
    torch.testing.assert_close(value, loss_of(backend, target, teacher, reference)(student), **TOLERANCE)
    with forward_ad.dual_level():
        dual = auto(forward_ad.make_dual(student, tangent))
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, derivative, **TOLERANCE)
    torch.testing.assert_close(torch.func.grad(auto)(student), gradient, **TOLERANCE)


@pytest.mark.parametrize("backend", FUSED)
def test_a_dual_level_without_a_student_tangent_runs_the_fused_backend(backend):
    student, target, teacher, reference, _ = case()
    with forward_ad.dual_level():
        value = loss_of(backend, target, teacher, reference)(student)
    torch.testing.assert_close(value, loss_of("reference", target, teacher, reference)(student), **TOLERANCE)


@pytest.mark.parametrize("backend", FUSED)
def test_a_tangent_on_the_teacher_is_refused_by_a_fused_backend(backend):
    """The fused kernels' autograd cannot carry any tangent; "auto" runs the reference, to which the teacher is
    a constant (the loss is differentiable with respect to the student only)."""
    student, target, teacher, reference, tangent = case()
    student.requires_grad_()
    with forward_ad.dual_level():
        dual_teacher = forward_ad.make_dual(teacher, tangent)
        with pytest.raises(NotImplementedError, match=f"backend='{backend}' does not support forward-mode AD"):
            loss_of(backend, target, dual_teacher, reference)(student)
        value = loss_of("auto", target, dual_teacher, reference)(student)
    torch.testing.assert_close(value.detach(), loss_of(backend, target, teacher, reference)(student).detach(),
                               **TOLERANCE)


@pytest.mark.skipif(not extension_loaded() or DEVICE != "cpu", reason="needs the compiled smskd_fast._C")
def test_forward_mode_inside_torch_compile():
    """Dynamo traces torch.func.jvp around the loss: the compiled call takes the reference under "auto" and
    refuses the cpu backend, as eager does (it used to compile the fused op with a zero tangent)."""
    student, target, teacher, reference, tangent = case()

    def jvp(backend):
        return torch.compile(lambda x: torch.func.jvp(loss_of(backend, target, teacher, reference), (x,),
                                                      (tangent,))[1], fullgraph=True, backend="aot_eager")

    gradient = backward_gradient("cpu", student, target, teacher, reference)
    torch.testing.assert_close(jvp("auto")(student), (gradient * tangent).sum(), **TOLERANCE)
    with pytest.raises(Exception, match="backend='cpu' does not support forward-mode AD"):
        jvp("cpu")(student)


@pytest.mark.skipif(not extension_loaded() or DEVICE != "cpu", reason="needs the compiled smskd_fast._C")
@pytest.mark.parametrize("transform", ["grad", "vmap_of_grad"])
def test_func_grad_inside_torch_compile(transform):
    """Dynamo traces torch.func.grad (and vmap of it) around the loss: fullgraph compiles, "auto" takes the
    reference and the cpu backend refuses, as eagerly. The transform check read functorch's interpreter
    stack, which Dynamo cannot trace: every such call failed under fullgraph=True."""
    student, target, teacher, reference, _ = case()
    students = torch.stack((student, 0.5 * student - 1))

    def compiled(backend):
        grad = torch.func.grad(loss_of(backend, target, teacher, reference))
        if transform == "vmap_of_grad":
            grad = torch.func.vmap(grad)
        return torch.compile(grad, fullgraph=True, backend="aot_eager")

    inputs = student if transform == "grad" else students
    expected = (backward_gradient("cpu", student, target, teacher, reference) if transform == "grad" else
                torch.stack([backward_gradient("cpu", x, target, teacher, reference) for x in students]))
    torch.testing.assert_close(compiled("auto")(inputs), expected, **TOLERANCE)
    with pytest.raises(Exception, match="backend='cpu' does not support torch.func's reverse mode"):
        compiled("cpu")(inputs)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_gradients_with_vmap_of_grad(backend, reduction):
    """vmap(grad(loss)) over a batch of students and targets: each sample's gradient (under a transform the
    reduction avoids _foreach_mul and the host reads no target value, which vmap cannot batch)."""
    student, target, teacher, reference, _ = case()
    students = torch.stack((student, 0.5 * student - 1))
    targets = torch.stack((target, target.flip(0)))

    def loss(x, y):
        return smskd_fast.smskd_loss(x, y, teacher, reference, temperature=2.0, reduction=reduction,
                                     backend=backend).loss

    expected = torch.stack([backward_gradient("reference", x, y, teacher, reference) * (
        (y != -100).sum() if reduction == "sum" else 1) for x, y in zip(students, targets)])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(students, targets), expected, **TOLERANCE)
    bad = targets.clone()
    bad[1, 2] = 33
    with pytest.raises((ValueError, RuntimeError), match="33"):  # the fused op's check, or the reference's gather
        torch.func.vmap(loss)(students, bad)


@pytest.mark.parametrize("backend", FUSED)
def test_linearize_runs_the_reference_under_auto(backend):
    """torch.func.linearize traces jvp with make_fx (proxies hold no values: the host checks of the target and
    of a top-k teacher step aside, as under torch.compile): its linear map is <gradient, tangent> of the fused
    backend's own loss.backward(), dense and top-k."""
    student, target, teacher, reference, tangent = case()
    topk = smskd_fast.TopKTeacher.from_logits(teacher, target, 5, 2.0)
    for teacher_args in (dict(teacher_logits=teacher), dict(teacher_topk=topk)):
        def loss(x, chosen):
            return smskd_fast.smskd_loss(x, target, reference_logits=reference, temperature=2.0, backend=chosen,
                                         **teacher_args).loss
        leaf = student.clone().requires_grad_()
        loss(leaf, backend).backward()
        value, linear = torch.func.linearize(lambda x: loss(x, "auto"), student)
        torch.testing.assert_close(linear(tangent), (leaf.grad * tangent).sum(), **TOLERANCE)
        torch.testing.assert_close(value, loss(student, backend), **TOLERANCE)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_jacobian_vectorized_over_backward(backend, reduction):
    """torch.autograd.functional.jacobian(vectorize=True) runs the fused backend's backward once on a batch of
    grad_outputs (autograd's own batched tensors): the saved gradient is scaled out of place (it failed reading
    the batched factor on the host), and the Jacobian equals the row-by-row one (vectorize=False)."""
    student, target, teacher, reference, _ = case()

    def loss(x):
        return smskd_fast.smskd_loss(x, target, teacher, reference, temperature=2.0, reduction=reduction,
                                     backend=backend).loss

    vectorized = torch.autograd.functional.jacobian(loss, student, vectorize=True)
    torch.testing.assert_close(vectorized, torch.autograd.functional.jacobian(loss, student), rtol=0, atol=0)
    assert vectorized.abs().max() > 0


@pytest.mark.parametrize("backend", FUSED)
def test_vmap_runs_the_fused_backend_per_sample(backend):
    student, target, teacher, reference, _ = case()
    batch = torch.stack((student, -student, 0.5 * student))
    loss = loss_of(backend, target, teacher, reference)
    torch.testing.assert_close(torch.func.vmap(loss)(batch), torch.stack([loss(sample) for sample in batch]),
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_fused_linear_refuses_transforms_and_tangents(backend):
    generator = torch.Generator().manual_seed(6)
    hidden, teacher_hidden, tangent = (torch.randn(5, 8, generator=generator) for _ in range(3))
    weight, teacher_weight = (torch.randn(20, 8, generator=generator) for _ in range(2))
    target = torch.randint(0, 20, (5,), generator=generator)

    def loss(h, w=weight):
        return fused_linear_smskd_loss(h, w, target, teacher_hidden, teacher_weight, backend=backend).loss

    refused = "fused_linear_smskd_loss: torch.func transforms .* are not supported"
    for transform in (lambda: torch.func.jvp(loss, (hidden,), (tangent,)), lambda: torch.func.grad(loss)(hidden),
                      lambda: torch.func.vmap(loss)(hidden[None].expand(2, 5, 8))):
        with pytest.raises(NotImplementedError, match=refused):
            transform()
    expected = loss(hidden)
    with forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match=refused):
            loss(hidden, forward_ad.make_dual(weight, torch.ones_like(weight)))
        torch.testing.assert_close(loss(hidden), expected, rtol=0, atol=0)  # no tangent: it runs


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("overwrite", [False, True], ids=["functional", "overwrite"])
def test_a_fused_backend_refuses_double_backward(backend, overwrite):
    """A gradient penalty on a linear head's weight: the fused backends refuse create_graph=True (their
    gradient has no derivative of its own); plain backward still runs; the reference differentiates twice."""
    student, target, teacher, reference, _ = case()
    head = torch.nn.Linear(33, 33, device=DEVICE)

    def loss(name):
        logits = head(student)
        return smskd_fast.smskd_loss(logits, target, teacher, reference, temperature=2.0, backend=name,
                                     overwrite_student_logits=overwrite).loss

    with pytest.raises(NotImplementedError, match="create_graph=True .* needs backend='reference'"):
        torch.autograd.grad(loss(backend), head.weight, create_graph=True)
    (first,) = torch.autograd.grad(loss(backend), head.weight)
    (reference_first,) = torch.autograd.grad(loss("reference"), head.weight, create_graph=True)
    torch.testing.assert_close(first, reference_first.detach(), **TOLERANCE)
    (second,) = torch.autograd.grad(reference_first.pow(2).sum(), head.weight)
    assert second.abs().max() > 0


def test_fused_linear_refuses_double_backward():
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(5, 8, generator=generator)
    weight = torch.randn(20, 8, generator=generator).requires_grad_()
    target = torch.randint(0, 20, (5,), generator=generator)
    loss = fused_linear_smskd_loss(hidden, weight, target, teacher_logits=torch.randn(5, 20, generator=generator),
                                   backend="reference").loss
    with pytest.raises(NotImplementedError, match="create_graph=True"):
        torch.autograd.grad(loss, weight, create_graph=True)


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file's Triton cases under TRITON_INTERPRET=1 in a fresh interpreter (tests/triton_interpreter.py)."""
    run_under_interpreter(__file__, "-k", "triton")
