"""smskd_loss under torch.func.vmap, torch.func.functionalize and torch.export, with its SMSKDLossOutput.

Oracles: the same backend called sample by sample (vmap's values, bit for bit), the eager call (export's),
and the float64 reference backend's gradient (functionalize's). SMSKDLossOutput is a pytree node, so the
transforms take it apart and put it back; vmap refused it ("must only return Tensors") and torch.export
did not know its type. The fused ops' gradient output is not differentiable: returned by backward as the
student's gradient, it carried the op's grad_fn where the registered autograd ran (functionalize, a direct
op call), and under functionalize the fused backends computed no gradient at all ("compute_grad=False").
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import smskd_fast
from smskd_fast.ops.extension import extension_loaded
from triton_interpreter import DEVICE, gpu_only, needs_kernels, reruns_under_interpreter, run_under_interpreter

needs_compiled_cpu = pytest.mark.skipif(not extension_loaded() or DEVICE != "cpu",
                                        reason="needs the compiled smskd_fast._C and CPU tensors")
FUSED = [pytest.param("cpu", marks=needs_compiled_cpu), pytest.param("triton", marks=needs_kernels)]
BACKENDS = [pytest.param("reference"), *FUSED]
BATCH, ROWS, CLASSES = 3, 5, 11
TEMPERATURE = 2.0
IGNORE = -100
TOLERANCE = dict(rtol=2e-5, atol=2e-6)  # float32 kernels against the float64 reference
FIELDS = [field.name for field in dataclasses.fields(smskd_fast.SMSKDLossOutput)]


def samples():
    """B samples of (N, C) student, teacher and reference logits and (N,) targets; one ignored row."""
    generator = torch.Generator().manual_seed(5)
    student, teacher, reference = (torch.randn(BATCH, ROWS, CLASSES, generator=generator).mul(2).to(DEVICE)
                                   for _ in range(3))
    target = torch.randint(0, CLASSES, (BATCH, ROWS), generator=generator).to(DEVICE)
    target[1, 2] = IGNORE
    return student, target, teacher, reference


def loss_of(backend, reduction="mean"):
    """smskd_loss(student, target, teacher, reference) with this backend, as the transforms call it."""
    def loss(student, target, teacher, reference):
        return smskd_fast.smskd_loss(student, target, teacher, reference.to(student.dtype), temperature=TEMPERATURE,
                                     ref_weight=0.5, reduction=reduction, backend=backend)
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_vmap_returns_each_samples_loss_output(backend, reduction):
    """vmap(smskd_loss) gives an SMSKDLossOutput whose every field is the per-sample calls' field, stacked."""
    student, target, teacher, reference = samples()
    loss = loss_of(backend, reduction)
    batched = torch.func.vmap(loss, in_dims=(0, 0, 0, None))(student, target, teacher, reference[0])
    assert isinstance(batched, smskd_fast.SMSKDLossOutput)
    calls = [loss(student[b], target[b], teacher[b], reference[0]) for b in range(BATCH)]
    for name in FIELDS:
        expected = torch.stack([getattr(call, name) for call in calls])
        torch.testing.assert_close(getattr(batched, name), expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", [pytest.param("auto", marks=needs_compiled_cpu), *FUSED[:1],
                                     pytest.param("triton", marks=gpu_only)])
def test_vmap_inside_torch_compile(backend):
    """torch.compile(fullgraph=True) of vmap(smskd_loss) (model ensembling in a compiled step): each sample's
    values, and through backward the float64 reference's gradient; under no_grad the values alone. Dynamo
    could trace neither the transform check nor the batched student's unwrapping: fullgraph failed."""
    student, target, teacher, reference = samples()

    def batched(s, y, t):
        return torch.func.vmap(loss_of(backend), in_dims=(0, 0, 0, None))(s, y, t, reference[0]).loss

    compiled = torch.compile(batched, fullgraph=True, backend="aot_eager")
    leaf = student.clone().requires_grad_()
    values = compiled(leaf, target, teacher)
    values.sum().backward()
    reference_leaf = student.double().requires_grad_()
    expected = torch.stack([loss_of("reference")(reference_leaf[b], target[b], teacher[b].double(), reference[0])
                            .loss for b in range(BATCH)])
    expected.sum().backward()
    torch.testing.assert_close(values.double(), expected.detach(), **TOLERANCE)
    torch.testing.assert_close(leaf.grad.double(), reference_leaf.grad, **TOLERANCE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(student, target, teacher), values.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export_returns_the_loss_output(backend):
    """A module returning smskd_loss's output exports, and the exported program returns the eager values."""
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("torch.export traces the Triton op for a GPU; the interpreter runs only eagerly")

    class Distiller(torch.nn.Module):
        def forward(self, student, target, teacher, reference):
            return loss_of(backend, "none")(student, target, teacher, reference)

    arguments = [value[0] for value in samples()]
    exported = torch.export.export(Distiller(), tuple(arguments))
    got, expected = exported.module()(*arguments), Distiller()(*arguments)
    assert isinstance(got, smskd_fast.SMSKDLossOutput)
    for name in FIELDS:
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_backward_through_functionalize(backend, reduction):
    """functionalize(loss), returning the whole SMSKDLossOutput, then autograd.grad of its loss: the float64
    reference's gradient, itself not differentiable (no grad_fn), as outside the transform."""
    student, target, teacher, reference = (value[0] for value in samples())
    leaf = student.clone().requires_grad_()
    functional = torch.func.functionalize(lambda s: loss_of(backend, reduction)(s, target, teacher, reference))
    output = functional(leaf)
    assert isinstance(output, smskd_fast.SMSKDLossOutput)
    value = output.loss.sum()
    (gradient,) = torch.autograd.grad(value, leaf)
    assert not gradient.requires_grad and gradient.grad_fn is None

    reference_leaf = student.double().requires_grad_()
    expected = loss_of("reference", reduction)(reference_leaf, target, teacher.double(), reference).loss.sum()
    (expected_gradient,) = torch.autograd.grad(expected, reference_leaf)
    torch.testing.assert_close(value.double(), expected.detach(), **TOLERANCE)
    torch.testing.assert_close(gradient.double(), expected_gradient, **TOLERANCE)
    assert gradient.abs().sum() > 0


@needs_compiled_cpu
def test_the_op_called_directly_differentiates_its_loss_only():
    """The compiled op under its registered autograd: only the loss requires grad; the per-row parts and the
    gradient output do not, and the gradient backward returns is not differentiable."""
    student, target, teacher, reference = (value[0] for value in samples())
    leaf = student.clone().requires_grad_()
    outputs = torch.ops.smskd_fast.smskd_loss_rows(leaf, target, teacher, reference, TEMPERATURE, 1.0, 1.0, 0.5,
                                                   "inverse_tcp", IGNORE, True, None, "sum")
    assert outputs[0].requires_grad
    assert not any(output.requires_grad for output in outputs[1:])
    (gradient,) = torch.autograd.grad(outputs[0], leaf)
    assert not gradient.requires_grad and gradient.grad_fn is None
    reference_leaf = student.double().requires_grad_()
    expected = loss_of("reference", "sum")(reference_leaf, target, teacher.double(), reference).loss
    (expected_gradient,) = torch.autograd.grad(expected, reference_leaf)
    torch.testing.assert_close(gradient.double(), expected_gradient, **TOLERANCE)


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    run_under_interpreter(__file__)
