"""The triton backend's grad_scale (ops/schema.py GRAD_SCALE): the gradient written is scale * d loss_i / d s_i.

The ops and launchers with a grad_scale tensor against the same without it (a power of two
scales every rounding exactly, so the gradients must agree bitwise; other values within
float32 rounding of the coefficients) and against the float64 reference backend; the
per-row outputs never scaled; no grad_scale the default; C = 1 still exactly zero; the
public API's reductions and grad_output values, with and without overwrite_student_logits;
backward's row scaling kernel (ops/scale_rows.py) under the interpreter; opcheck; errors.
Where the cases run: tests/triton_interpreter.py. Tolerances: tests/tolerances.py.
"""
from __future__ import annotations

import pytest
import torch

import smskd_fast
from smskd_fast.backends.base import LossOptions
from smskd_fast.backends.topk import TopKTeacher
from test_triton_backend import make_inputs, reference_rows, triton_tolerance
from tolerances import FP32_EPS, unit_roundoff
from topk_cases import make_inputs as make_topk_inputs
from topk_cases import run_reference as run_topk_reference
from conftest import assert_bitwise_equal, signaling_nan
from triton_interpreter import DEVICE, INTERPRETED, needs_kernels, reruns_under_interpreter, run_under_interpreter

OPTIONS = LossOptions(temperature=2.5, ce_weight=0.7, kd_weight=1.3, ref_weight=0.9)
# ce + T (kd + ref) bounds the gradient's coefficients (softmaxes are at most 1): the size of the terms whose
# cancellation the absolute tolerances cover.
COEFFICIENTS = OPTIONS.ce_weight + OPTIONS.temperature * (OPTIONS.kd_weight + OPTIONS.ref_weight)
ROUNDINGS = 8  # per gradient entry: the scaled coefficients, their products with the softmaxes, the sums


def scale_tensor(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=DEVICE)


def dense_op(student, target, teacher, reference, *grad_scale, compute_grad=True):
    return torch.ops.smskd_fast.smskd_loss_rows_triton(
        student, target, teacher, reference, OPTIONS.temperature, OPTIONS.ce_weight, OPTIONS.kd_weight,
        OPTIONS.ref_weight, OPTIONS.weighting, OPTIONS.ignore_index, compute_grad, *grad_scale)


def topk_op(student, target, topk, reference, *grad_scale, compute_grad=True):
    return torch.ops.smskd_fast.smskd_loss_rows_topk_triton(
        student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
        topk.log_sum_exp_at_temperature, reference, OPTIONS.temperature, OPTIONS.ce_weight, OPTIONS.kd_weight,
        OPTIONS.ref_weight, OPTIONS.weighting, OPTIONS.ignore_index, compute_grad, *grad_scale)


def topk_on_device(student, target, topk, reference):
    def move(t):
        return None if t is None else t.to(DEVICE)

    return move(student), move(target), topk.map_tensors(move), move(reference)


def check_scaled(run, expected_grad: torch.Tensor, dtype: torch.dtype) -> None:
    """run(*grad_scale) gives an op's outputs: with grad_scale, the per-row outputs bitwise those without it and
    the gradient scale times it (bitwise for 1/4, within the coefficients' fp32 rounding for 1/3 and 3), and
    scale times the float64 reference gradient expected_grad within the triton tolerance scaled alike."""
    unscaled = run()
    assert len(unscaled) == 7
    _, grad_tol = triton_tolerance(dtype, OPTIONS.temperature)
    for value in (0.25, 1 / 3, 3.0):
        scale = scale_tensor(value)
        scaled = run(scale)
        for name, got, want in zip(("loss", "ce", "kd", "ref", "tcp", "weight"), scaled[:6], unscaled[:6]):
            assert_bitwise_equal(got, want, f"{name} must not be scaled")
        grad, want = scaled[6].cpu(), unscaled[6].cpu().double() * float(scale)
        assert grad.dtype == dtype
        if value == 0.25:  # a power of two scales every intermediate exactly (no value is near underflow here)
            assert_bitwise_equal(grad, want.to(dtype), "grad with grad_scale 1/4")
        # Both are rounded to dtype once (rtol: two of its unit roundoffs); the scaled coefficients' fp32
        # roundings move entries by a few ulps of the terms they multiply (atol).
        rtol = 2 * unit_roundoff(dtype) * (1 + unit_roundoff(dtype))
        torch.testing.assert_close(grad.double(), want, rtol=rtol,
                                   atol=ROUNDINGS * FP32_EPS * COEFFICIENTS * float(scale))
        torch.testing.assert_close(grad.double(), expected_grad * float(scale), rtol=grad_tol["rtol"],
                                   atol=grad_tol["atol"] * float(scale))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [37, 4100])  # the tile kernel; the online kernel (C > launch.TILE_MAX_C)
def test_dense_op_scales_the_gradient_only(c, dtype):
    student, target, teacher, reference = make_inputs(5, c, dtype, seed=c)
    target[2] = -100
    _, expected_grad = reference_rows(student.cpu(), target.cpu(), teacher.cpu(), reference.cpu(), OPTIONS)
    check_scaled(lambda *scale: dense_op(student, target, teacher, reference, *scale), expected_grad, dtype)


@needs_kernels
@pytest.mark.parametrize("weighting, present", [("constant", (False, True, False)), ("constant", (True, False, False)),
                                                 ("tcp", (True, True, True))])
def test_online_kernel_scales_each_coefficient(weighting, present):
    """Forced 64-column blocks (the online kernel at small C) with one term at a time, then all three."""
    from smskd_fast.backends.triton import launch as triton_launch

    student, target, teacher, reference = make_inputs(4, 300, seed=7)
    inputs = [x if keep else None for x, keep in zip((target, teacher, reference), present)]
    options = LossOptions(OPTIONS.temperature, OPTIONS.ce_weight, OPTIONS.kd_weight, OPTIONS.ref_weight, weighting)
    _, expected_grad = reference_rows(student, *inputs, options)

    def run(*scale):
        return triton_launch.launch_rows(student, *inputs, options.temperature, options.ce_weight, options.kd_weight,
                                         options.ref_weight, weighting, -100, True, *scale,
                                         config=triton_launch.OnlineConfig(64, 4))

    check_scaled(run, expected_grad, torch.float32)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c, k", [(300, 7), (300, 300), (4100, 7)])  # whole rows; k = C; column blocks
def test_topk_op_scales_the_gradient_only(c, k, dtype):
    student, target, topk, reference = make_topk_inputs(4, c, k, dtype, seed=k, temperature=OPTIONS.temperature)
    _, expected_grad = run_topk_reference(student, target, topk, reference, OPTIONS)
    student, target, topk, reference = topk_on_device(student, target, topk, reference)
    check_scaled(lambda *scale: topk_op(student, target, topk, reference, *scale), expected_grad, dtype)


@needs_kernels
def test_topk_forced_column_blocks_scale_the_gradient():
    from smskd_fast.backends.triton import topk_launch as triton_topk_launch

    student, target, topk, reference = make_topk_inputs(3, 300, 5, torch.float32, seed=3,
                                                        temperature=OPTIONS.temperature)
    _, expected_grad = run_topk_reference(student, target, topk, reference, OPTIONS)
    student, target, topk, reference = topk_on_device(student, target, topk, reference)

    def run(*scale):
        return triton_topk_launch.launch_topk_rows(
            student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
            topk.log_sum_exp_at_temperature, reference, OPTIONS.temperature, OPTIONS.ce_weight, OPTIONS.kd_weight,
            OPTIONS.ref_weight, OPTIONS.weighting, -100, True, *scale,
            config=triton_topk_launch.TopKConfig(64, 4, False))

    check_scaled(run, expected_grad, torch.float32)


@needs_kernels
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
def test_no_grad_scale_is_the_default(topk):
    """grad_scale=None gives bitwise what omitting it gives, which matches the float64 reference; without
    compute_grad a grad_scale changes nothing and there is no gradient."""
    from test_triton_backend import assert_rows_match

    if topk:
        student, target, topk_teacher, reference = make_topk_inputs(4, 300, 7, torch.float32, seed=1,
                                                                    temperature=OPTIONS.temperature)
        expected, expected_grad = run_topk_reference(student, target, topk_teacher, reference, OPTIONS)
        student, target, topk_teacher, reference = topk_on_device(student, target, topk_teacher, reference)

        def run(*scale, compute_grad=True):
            return topk_op(student, target, topk_teacher, reference, *scale, compute_grad=compute_grad)
    else:
        student, target, teacher, reference = make_inputs(4, 300, seed=1)
        expected, expected_grad = reference_rows(student.cpu(), target.cpu(), teacher.cpu(), reference.cpu(),
                                                 OPTIONS)

        def run(*scale, compute_grad=True):
            return dense_op(student, target, teacher, reference, *scale, compute_grad=compute_grad)

    omitted, none = run(), run(None)
    for index, (got, want) in enumerate(zip(none, omitted)):
        assert_bitwise_equal(got, want, f"output {index}")
    assert_rows_match([t.cpu() for t in none], expected, expected_grad, torch.float32)
    without_grad = run(scale_tensor(0.5), compute_grad=False)
    assert without_grad[6].shape == (0, 300)
    for index, (got, want) in enumerate(zip(without_grad[:6], omitted[:6])):
        assert_bitwise_equal(got, want, f"output {index} without compute_grad")


@needs_kernels
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_one_class_scaled_gradient_is_exactly_zero(temperature):
    """C = 1 with a grad_scale: each coefficient (scaled) times q - p with q == p is still exactly 0, in the tile,
    the forced online and the top-k kernels."""
    from smskd_fast.backends.triton import launch as triton_launch
    from smskd_fast.backends.triton import topk_launch as triton_topk_launch

    student, target, teacher, reference = make_inputs(16, 1, seed=5)
    target[3] = -100
    scale = scale_tensor(1 / 3)
    outputs = [triton_launch.launch_rows(student, target, teacher, reference, temperature, 0.7, 1.3, 0.9,
                                         weighting, -100, True, scale, config=config)
               for weighting in ("inverse_tcp", "tcp") for config in (None, triton_launch.OnlineConfig(16, 4))]
    topk = topk_on_device(student, target, TopKTeacher.from_logits(teacher.cpu(), target.cpu(), 1, temperature), None)[2]
    outputs.append(triton_topk_launch.launch_topk_rows(
        student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
        topk.log_sum_exp_at_temperature, reference, temperature, 0.7, 1.3, 0.9, "inverse_tcp", -100, True, scale))
    for index, out in enumerate(outputs):
        for name, value in zip(("loss", "ce", "kd", "ref", "grad"), (*out[:4], out[6])):
            assert torch.count_nonzero(value).item() == 0, (index, name, value[value != 0].tolist())


def public_loss(student, target, teacher, reference, topk, reduction, backend, overwrite=False):
    return smskd_fast.smskd_loss(student, target, None if topk is not None else teacher, reference, teacher_topk=topk,
                                 temperature=OPTIONS.temperature, ce_weight=OPTIONS.ce_weight,
                                 kd_weight=OPTIONS.kd_weight, ref_weight=OPTIONS.ref_weight, reduction=reduction,
                                 backend=backend, overwrite_student_logits=overwrite)


@needs_kernels
@pytest.mark.parametrize("overwrite", [False, True], ids=["new_buffer", "overwrite"])
@pytest.mark.parametrize("grad_output", [1.0, 0.37])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
def test_public_api_gradient_matches_the_reference(topk, reduction, grad_output, overwrite):
    """smskd_loss(backend='triton') differentiated with grad_output (per row for "none": grad_output times a
    row ramp) against the float64 reference; "mean" folds 1/5 (five valid rows of six) into the kernel."""
    student, target, teacher, reference = make_inputs(6, 40, seed=11)
    target[4] = -100
    topk_teacher = TopKTeacher.from_logits(teacher.cpu(), target.cpu(), 5, OPTIONS.temperature) if topk else None
    if reduction == "none":
        weights = grad_output * torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    else:
        weights = torch.tensor(grad_output, dtype=torch.float64)

    leaf64 = student.detach().cpu().double().requires_grad_()
    topk64 = None if topk_teacher is None else TopKTeacher(*(
        t.double() if t.is_floating_point() else t for t in topk_teacher.tensors()))
    want = public_loss(leaf64, target.cpu(), teacher.cpu().double(), reference.cpu().double(), topk64, reduction,
                       "reference")
    want.loss.backward(weights)

    leaf = student.detach().clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, contiguous: the overwrite path may use its memory
    storage = logits.data_ptr()
    topk_device = None if topk_teacher is None else topk_on_device(student, target, topk_teacher, None)[2]
    got = public_loss(logits, target, teacher, reference, topk_device, reduction, "triton", overwrite)
    got.loss.backward(weights.to(torch.float32).to(DEVICE))

    value_tol, grad_tol = triton_tolerance(torch.float32, OPTIONS.temperature)
    rows = 6 if reduction == "sum" else 1  # a sum of six rows' errors
    torch.testing.assert_close(got.loss.detach().cpu().double(), want.loss.detach(), rtol=value_tol["rtol"],
                               atol=value_tol["atol"] * rows)
    size = float(weights.abs().max()) / (5 if reduction == "mean" else 1)  # the gradient's scale
    torch.testing.assert_close(leaf.grad.cpu().double(), leaf64.grad, rtol=grad_tol["rtol"],
                               atol=grad_tol["atol"] * size)
    if overwrite:
        assert logits.data_ptr() == storage
        assert_bitwise_equal(logits.detach(), leaf.grad, "the logits' memory holds the gradient")


@needs_kernels
def test_kd_loss_mean_gradient_matches_the_reference():
    student, _, teacher, _ = make_inputs(6, 40, seed=12)
    leaf64 = student.detach().cpu().double().requires_grad_()
    smskd_fast.kd_loss(leaf64, teacher.cpu().double(), temperature=OPTIONS.temperature,
                       backend="reference").backward(torch.tensor(0.37, dtype=torch.float64))
    leaf = student.detach().clone().requires_grad_()
    smskd_fast.kd_loss(leaf, teacher, temperature=OPTIONS.temperature, backend="triton").backward(
        torch.tensor(0.37, device=DEVICE))
    _, grad_tol = triton_tolerance(torch.float32, OPTIONS.temperature)
    torch.testing.assert_close(leaf.grad.cpu().double(), leaf64.grad, rtol=grad_tol["rtol"],
                               atol=grad_tol["atol"] * 0.37 / 6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [1, 5, 4097])  # one column; odd; two column blocks of the kernel, the last of one
def test_scale_rows_kernel(c, dtype):
    """ops/scale_rows.py's Triton kernel: rows whose factor is exactly 1 keep their bits, the others become
    grad.float() * factor rounded once to grad's dtype (see rounded_like_the_kernels)."""
    from smskd_fast.ops.scale_rows import launch_scale_rows

    generator = torch.Generator().manual_seed(c)
    grad = (torch.randn(6, c, generator=generator) * 3).to(dtype)
    grad[0, 0] = signaling_nan(dtype)  # a factor-1 row keeps its bits: multiplied by 1 it would be quiet
    grad[3, -1] = -0.0
    factor = torch.tensor([1.0, 0.2, 1.0, 1 / 3, 3.0, 1.0], dtype=torch.float32)
    before = grad.clone()
    launch_scale_rows(grad, factor)
    for row in range(6):
        want = before[row] if factor[row] == 1 else rounded_like_the_kernels(before[row].float() * factor[row], dtype)
        assert_bitwise_equal(grad[row], want, f"row {row}")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("factor", [1.0, 0.37])
@pytest.mark.parametrize("rows", [3, 1030])  # fewer rows than programs; more (programs stride over rows)
def test_scale_rows_kernel_with_one_factor_for_all_rows(rows, factor, dtype):
    """A 0-d factor (a reduced loss's grad_output): 1 leaves every bit alone, another value scales every row
    once; rows beyond the programs' count are reached by their stride."""
    from smskd_fast.ops.scale_rows import launch_scale_rows

    generator = torch.Generator().manual_seed(rows)
    grad = (torch.randn(rows, 5, generator=generator) * 3).to(dtype)
    if factor == 1.0:
        grad[0, 0] = signaling_nan(dtype)  # x 1 would make it a quiet NaN: kept bits show the rows were skipped
    before = grad.clone()
    launch_scale_rows(grad, torch.tensor(factor))
    want = before if factor == 1.0 else rounded_like_the_kernels(before.float() * factor, dtype)
    assert_bitwise_equal(grad, want, "all rows")


def rounded_like_the_kernels(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values as a Triton kernel's .to(dtype) stores them: compiled, rounded to nearest (cvt.rn), as torch
    rounds; under the interpreter, bf16 by truncation (triton/runtime/interpreter.py converts fp32 to bf16
    without a rounding mode: it drops the low 16 bits)."""
    if dtype == torch.float32:
        return values
    if INTERPRETED and dtype == torch.bfloat16:
        return (values.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    return values.to(dtype)


@needs_kernels
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
def test_opcheck_with_grad_scale(topk):
    student, target, teacher, reference = make_inputs(4, 20)
    scale = scale_tensor(0.25)
    scalars = (2.0, 1.0, 1.0, 1.0, "inverse_tcp", -100, True, scale)
    if topk:
        t = TopKTeacher.from_logits(teacher.cpu(), target.cpu(), 3, 2.0)
        t = topk_on_device(student, target, t, None)[2]
        op = torch.ops.smskd_fast.smskd_loss_rows_topk_triton
        args = (student.requires_grad_(), target, t.values, t.indices, t.true_logit, t.log_sum_exp,
                t.log_sum_exp_at_temperature, reference, *scalars)
    else:
        op = torch.ops.smskd_fast.smskd_loss_rows_triton
        args = (student.requires_grad_(), target, teacher, reference, *scalars)
    if INTERPRETED:  # as test_triton_backend.py::test_opcheck: AOT dispatch would run interpreted kernels on fakes
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    else:
        utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=utils)


@needs_kernels
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
def test_bad_grad_scale_is_refused_with_its_name(topk):
    """As the compiled ops refuse it (csrc/grad_scale_arg.h): one value, float32, on the student's device."""
    student, target, teacher, reference = make_inputs(2, 5)
    if topk:
        t = topk_on_device(student, target, TopKTeacher.from_logits(teacher.cpu(), target.cpu(), 2, 2.5), None)[2]

        def run(scale):
            return topk_op(student, target, t, reference, scale)
        name = "smskd_loss_rows_topk_triton"
    else:
        def run(scale):
            return dense_op(student, target, teacher, reference, scale)
        name = "smskd_loss_rows_triton"
    for shape in ((2,), (1, 1)):
        with pytest.raises(ValueError, match=rf"{name}: grad_scale must be a 0-d tensor \(one value\), got shape"):
            run(torch.full(shape, 0.5, device=DEVICE))
    with pytest.raises(TypeError, match=f"{name}: grad_scale must be torch.float32 .* got torch.float64"):
        run(torch.tensor(0.5, dtype=torch.float64, device=DEVICE))
    assert run(torch.full((1,), 0.5, device=DEVICE))[6].shape == (2, 5)  # one value in one dimension is accepted
    if DEVICE == "cuda":  # under the interpreter every real tensor is on the CPU
        with pytest.raises(ValueError, match=f"{name}: grad_scale must be on the student's device"):
            run(torch.tensor(0.5))


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file under TRITON_INTERPRET=1 in a fresh interpreter (see tests/triton_interpreter.py)."""
    run_under_interpreter(__file__)
