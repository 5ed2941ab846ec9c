"""The triton backend's top-k teacher form (smskd_loss_rows_topk_triton) against the float64 reference.

Oracle: the pure-PyTorch reference backend's top-k form (smskd_fast/backends/topk.py, its
gradient by autograd) in float64 on the same, exactly upcast, values
(tests/topk_cases.py); torch.library.opcheck. Where the cases run is
tests/triton_interpreter.py: here without a GPU they run under Triton's
interpreter in a subprocess (test_cases_under_the_interpreter), with small shapes.

Tolerances: the kernel accumulates in fp32, so per-row values (of order 10, with
T^2 = 16) agree to 2e-5 and the fp32 gradient to 2e-6; a bf16/fp16 gradient is the
float64 one rounded once to that dtype, within one unit in the last place.
"""
from __future__ import annotations

import pytest
import torch

import smskd_fast
from smskd_fast.backends.base import LossOptions
from smskd_fast.backends.topk import TopKTeacher
from test_triton_backend import assert_compiled_matches_eager, assert_rows_match, assert_same_schema
from topk_cases import FIELDS, make_inputs, run_reference
from triton_interpreter import DEVICE, INTERPRETED, gpu_only, needs_kernels, reruns_under_interpreter, \
    run_under_interpreter

WEIGHTINGS = ("inverse_tcp", "tcp", "constant")


def on_device(student, target, topk, reference):
    """The inputs of make_inputs on the device the kernels run on."""
    def move(t):
        return None if t is None else t.to(DEVICE)

    return move(student), move(target), TopKTeacher(*(move(t) for t in (
        topk.values, topk.indices, topk.true_logit, topk.log_sum_exp, topk.log_sum_exp_at_temperature))), \
        move(reference)


def topk_rows(student, target, topk, reference, options, compute_grad=True):
    return torch.ops.smskd_fast.smskd_loss_rows_topk_triton(
        student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
        topk.log_sum_exp_at_temperature, reference, options.temperature, options.ce_weight, options.kd_weight,
        options.ref_weight, options.weighting, options.ignore_index, compute_grad,
    )


def check_case(student, target, topk, reference, options, config=None):
    """The kernel (forced config, or the launch table's) against the float64 reference; returns the outputs."""
    from smskd_fast.backends.triton import topk_launch as triton_topk_launch

    expected, expected_grad = run_reference(student.cpu(), None if target is None else target.cpu(),
                                            TopKTeacher(*(t.cpu() for t in (
                                                topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
                                                topk.log_sum_exp_at_temperature))),
                                            None if reference is None else reference.cpu(), options)
    if config is None:
        outputs = topk_rows(student, target, topk, reference, options)
    else:
        outputs = triton_topk_launch.launch_topk_rows(
            student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
            topk.log_sum_exp_at_temperature, reference, options.temperature, options.ce_weight,
            options.kd_weight, options.ref_weight, options.weighting, options.ignore_index, True, config=config)
    outputs = [t.cpu() for t in outputs]
    assert_rows_match(outputs, expected, expected_grad, student.dtype)
    return outputs


# C = 17: the row in registers; C = 5000: column blocks of the launch table (2048);
# the GPU adds a wide whole row (1000) and LLM vocabularies.
SHAPES = [(5, 17), (4, 5000)]
if not INTERPRETED:
    SHAPES += [(64, 1000), (16, 32000), (4, 128256)]


@needs_kernels
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("k", [1, 3, "C"])
def test_matches_the_float64_reference(weighting, k):
    """Row 1 is ignored (make_inputs), so each case also checks that its outputs and gradient are zero."""
    n, c = SHAPES[0]
    options = LossOptions(temperature=4.0, ce_weight=0.3, kd_weight=0.9, ref_weight=0.7, weighting=weighting)
    inputs = on_device(*make_inputs(n, c, c if k == "C" else k, torch.float32, seed=len(weighting) + c))
    outputs = check_case(*inputs, options)
    assert torch.all(outputs[6][1] == 0) and all(float(v[1]) == 0 for v in outputs[:6])


@needs_kernels
@pytest.mark.parametrize("n,c", SHAPES[1:])
@pytest.mark.parametrize("k", [7, "C"] if not INTERPRETED else [7])
def test_wider_rows_match_the_float64_reference(n, c, k):
    options = LossOptions(temperature=2.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.8)
    check_case(*on_device(*make_inputs(n, c, c if k == "C" else k, torch.float32, seed=c, temperature=2.0)), options)


@needs_kernels
@pytest.mark.parametrize("k", [5, 300])
def test_small_column_blocks_with_a_late_maximum(k):
    """Forced 64-column blocks: a partial last block, the row maximum found late, k = C walked in k-blocks."""
    from smskd_fast.backends.triton.topk_launch import TopKConfig

    student, target, topk, reference = make_inputs(3, 300, k, torch.float32, seed=k, temperature=3.0)
    student[:, 250:] += 8.0
    options = LossOptions(temperature=3.0, ce_weight=0.4, kd_weight=1.0, ref_weight=0.6)
    check_case(*on_device(student, target, topk, reference), options, config=TopKConfig(64, 4, False))


@needs_kernels
@pytest.mark.parametrize("with_target, with_reference", [(False, False), (False, True), (True, False)])
def test_optional_inputs_match_the_reference(with_target, with_reference):
    """No target is kd_loss (ce = tcp = 0; w = 0 unless constant); no reference drops its term."""
    weighting = "inverse_tcp" if with_reference else "constant"
    options = LossOptions(temperature=2.0, ce_weight=1.0, kd_weight=1.0, ref_weight=0.5, weighting=weighting)
    inputs = make_inputs(6, 11, 4, torch.float32, temperature=2.0, with_target=with_target,
                         with_reference=with_reference)
    check_case(*on_device(*inputs), options)


@needs_kernels
def test_one_class_and_strided_rows():
    """C = k = 1 (no rest, a zero gradient); and rows sliced out of wider tensors (row stride != C)."""
    options = LossOptions(temperature=2.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.7)
    check_case(*on_device(*make_inputs(3, 1, 1, torch.float32, temperature=2.0)), options)
    student, target, topk, reference = make_inputs(5, 40, 6, torch.float32, seed=3, temperature=2.0)
    wide_student = torch.zeros(5, 48).index_copy_(1, torch.arange(3, 43), student)
    wide_reference = torch.zeros(5, 56).index_copy_(1, torch.arange(40), reference)
    student, reference = wide_student[:, 3:43], wide_reference[:, :40]
    assert student.stride(0) == 48 and reference.stride(0) == 56
    check_case(*on_device(student, target, topk, reference), options)


@needs_kernels
def test_a_teacher_with_no_rest_and_a_student_with_none():
    """p_rest = 0 (the teacher's kept mass is 1); rows 2-3 also have R = 0 (the student's rest is -inf)."""
    student, target, _, _ = make_inputs(4, 6, 2, torch.float32)
    target = target.clamp(0, 1)
    student[2:, 2:] = float("-inf")
    # Kept mass 1 + e^-30: p_rest = -expm1(log of it) < 0, clamped to 0, in fp32 and in fp64 alike.
    values = torch.tensor([[0.0, -30.0]]).expand(4, 2)
    zeros = torch.zeros(4)
    topk = TopKTeacher(values, torch.tensor([[0, 1]]).expand(4, 2), values.gather(1, target[:, None])[:, 0],
                       zeros, zeros)
    options = LossOptions(temperature=1.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.0, weighting="tcp")
    outputs = check_case(*on_device(student, target, topk, None), options)
    assert all(torch.isfinite(value).all() for value in outputs)


@needs_kernels
def test_a_rest_the_student_gives_no_mass_costs_infinity():
    """p_rest > 0 but the student's rest is -inf (R = 0): KD = +inf, as in the reference."""
    student, target, topk, _ = make_inputs(3, 8, 3, torch.float32, seed=4, temperature=2.0)
    keep = torch.zeros_like(student, dtype=torch.bool).scatter(-1, topk.indices, True)
    student = student.masked_fill(~keep, float("-inf"))
    target = topk.indices[:, 0].clone()
    options = LossOptions(temperature=2.0, weighting="constant")
    student, target, topk, _ = on_device(student, target, topk, None)
    outputs = topk_rows(student, target, topk, None, options, compute_grad=False)
    expected, _ = run_reference(student.cpu(), target.cpu(), TopKTeacher(*(t.cpu() for t in (
        topk.values, topk.indices, topk.true_logit, topk.log_sum_exp, topk.log_sum_exp_at_temperature))),
        None, options)
    assert torch.equal(expected.kd, torch.full_like(expected.kd, float("inf")))
    assert torch.equal(outputs[2].cpu(), torch.full((3,), float("inf")))
    torch.testing.assert_close(outputs[1].cpu().double(), expected.ce, rtol=2e-5, atol=2e-5)


@needs_kernels
@pytest.mark.parametrize("c", [9, 300])
def test_a_nan_teacher_value_gives_a_nan_row_not_a_dropped_class(c):
    """A NaN kept value makes that row's KD, loss and gradient NaN, as the reference gives (topk.py:
    p != 0 holds for NaN); the other rows match the reference. C = 300 runs forced 64-column blocks."""
    from smskd_fast.backends.triton import topk_launch as triton_topk_launch

    student, target, topk, _ = make_inputs(4, c, 3, torch.float32, seed=6, temperature=2.0)
    values = topk.values.clone()
    values[2, 1] = float("nan")
    topk = TopKTeacher(values, topk.indices, topk.true_logit, topk.log_sum_exp, topk.log_sum_exp_at_temperature)
    options = LossOptions(temperature=2.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.0, weighting="constant")
    expected, expected_grad = run_reference(student, target, topk, None, options)
    assert torch.isnan(expected.kd[2]) and torch.isnan(expected_grad[2]).all()  # the case is what it claims
    student, target, topk, _ = on_device(student, target, topk, None)
    config = None if c < 100 else triton_topk_launch.TopKConfig(64, 4, False)
    outputs = [t.cpu() for t in (topk_rows(student, target, topk, None, options) if config is None else
                                 triton_topk_launch.launch_topk_rows(
                                     student, target, topk.values, topk.indices, topk.true_logit,
                                     topk.log_sum_exp, topk.log_sum_exp_at_temperature, None, options.temperature,
                                     options.ce_weight, options.kd_weight, options.ref_weight, options.weighting,
                                     options.ignore_index, True, config=config))]
    kd, loss, grad = outputs[FIELDS.index("kd")], outputs[FIELDS.index("loss")], outputs[6]
    assert torch.isnan(kd[2]) and torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    keep = torch.tensor([0, 1, 3])
    for name, got in zip(FIELDS, outputs):
        torch.testing.assert_close(got[keep].double(), getattr(expected, name)[keep].double(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad[keep].double(), expected_grad[keep], rtol=1e-5, atol=2e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,c", SHAPES)
def test_half_precision_students(dtype, n, c):
    options = LossOptions(temperature=2.0, ce_weight=0.6, kd_weight=1.0, ref_weight=0.7)
    check_case(*on_device(*make_inputs(n, c, 5, dtype, seed=9, temperature=2.0)), options)


@needs_kernels
def test_out_of_range_indices_do_not_fault_nor_touch_other_rows():
    """Validation refuses such indices before a launch; the kernel itself only clamps its loads."""
    student, target, topk, reference = on_device(*make_inputs(4, 9, 3, torch.float32, seed=2))
    bad = topk.indices.clone()
    bad[2] = torch.tensor([9, -4, 1 << 40])
    broken = TopKTeacher(topk.values, bad, topk.true_logit, topk.log_sum_exp, topk.log_sum_exp_at_temperature)
    options = LossOptions()
    good = topk_rows(student, target, topk, reference, options)
    outputs = topk_rows(student, target, broken, reference, options)
    rows = [0, 1, 3]
    for got, want in zip(outputs, good):
        assert torch.equal(got[rows], want[rows])


@needs_kernels
def test_public_api_with_leading_dimensions():
    student, target, topk, reference = make_inputs(6, 12, 4, torch.float32, seed=5, temperature=3.0)
    shaped = TopKTeacher(topk.values.view(2, 3, 4), topk.indices.view(2, 3, 4), topk.true_logit.view(2, 3),
                         topk.log_sum_exp.view(2, 3), topk.log_sum_exp_at_temperature.view(2, 3))
    student, target, shaped, reference = on_device(student.view(2, 3, 12), target.view(2, 3), shaped,
                                                   reference.view(2, 3, 12))
    results = {}
    for backend in ("triton", "reference"):
        s = student.detach().clone().requires_grad_(True)
        out = smskd_fast.smskd_loss(s, target, None, reference, teacher_topk=shaped, temperature=3.0,
                                    backend=backend)
        out.loss.backward()
        results[backend] = (out, s.grad)
    (got, got_grad), (want, want_grad) = results["triton"], results["reference"]
    for name in FIELDS:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=2e-5, atol=2e-5, msg=name)
    torch.testing.assert_close(got_grad, want_grad, rtol=2e-6, atol=2e-6)


@needs_kernels
@pytest.mark.parametrize("c", [17, 300])
def test_overwrite_student_logits_stores_the_gradient_in_place(c, monkeypatch):
    from smskd_fast.backends.triton import topk_launch as triton_topk_launch

    if c > 17:  # the column-block path, in 64-column blocks
        monkeypatch.setattr(triton_topk_launch, "topk_config",
                            lambda num_classes: triton_topk_launch.TopKConfig(64, 4, False))
    student, target, topk, reference = on_device(*make_inputs(5, c, 4, torch.float32, seed=c))
    leaf = student.detach().clone().requires_grad_()
    expected = smskd_fast.smskd_loss(leaf, target, None, reference, teacher_topk=topk, backend="reference")
    (2.0 * expected.loss).backward()

    logits_leaf = student.detach().clone().requires_grad_()
    logits = logits_leaf * 1.0  # e.g. the output of a model's last layer
    storage = logits.data_ptr()
    out = smskd_fast.smskd_loss(logits, target, None, reference, teacher_topk=topk, backend="triton",
                                overwrite_student_logits=True)
    (2.0 * out.loss).backward()
    torch.testing.assert_close(out.loss, expected.loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(logits_leaf.grad, leaf.grad, rtol=2e-6, atol=2e-6)
    assert logits.data_ptr() == storage
    torch.testing.assert_close(logits.detach(), leaf.grad, rtol=2e-6, atol=2e-6)


@needs_kernels
def test_float64_is_refused_with_the_alternatives():
    student, target, topk, reference = on_device(*make_inputs(3, 5, 2, torch.float64))
    with pytest.raises(TypeError, match="use backend='cuda', 'cpu' or 'reference' for float64"):
        smskd_fast.smskd_loss(student, target, None, reference, teacher_topk=topk, backend="triton")


# The GPU adds a wider whole row and column blocks: launch configurations chosen from a
# symbolic C under test_aot_dispatch_dynamic (C <= 32 hid a SymInt bug, issue 15).
OPCHECK_CASES = [(3, 5, 2, True), (2, 6, 6, False), (0, 8, 3, True)]
if not INTERPRETED:
    OPCHECK_CASES += [(4, 100, 8, True), (3, 5000, 16, True)]


@needs_kernels
@pytest.mark.parametrize("n, c, k, compute_grad", OPCHECK_CASES)
def test_opcheck(n, c, k, compute_grad):
    student, target, topk, reference = on_device(*make_inputs(n, c, k, torch.float32, temperature=3.0))
    student.requires_grad_(compute_grad)
    args = (student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
            topk.log_sum_exp_at_temperature, reference, 3.0, 0.5, 0.8, 0.6, "inverse_tcp", -100, compute_grad)
    if INTERPRETED:
        # AOT dispatch would run the interpreted kernels on fake tensors; only the GPU runs those checks.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    else:
        utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.smskd_fast.smskd_loss_rows_topk_triton, args, test_utils=utils)


def test_kept_class_bitmask_sets_exactly_the_kept_bits():
    """Against a set per row: bit 31 (int32's sign bit), C not a multiple of 32, indices outside [0, C) ignored."""
    from smskd_fast.backends.triton.topk_bitmask import kept_class_bitmask

    indices = torch.tensor([[0, 31, 32, 69], [5, 63, 62, 1], [-1, 70, 1 << 40, 64]])
    bits = kept_class_bitmask(indices, 70)
    assert bits.dtype == torch.int32 and bits.shape == (3, 3)
    for row, expected in enumerate([{0, 31, 32, 69}, {1, 5, 62, 63}, {64}]):
        got = {j for j in range(70) if (int(bits[row, j // 32]) >> (j % 32)) & 1}
        assert got == expected


def test_op_has_the_schema_of_the_compiled_op():
    assert_same_schema("smskd_loss_rows_topk_triton", "smskd_loss_rows_topk")


@needs_kernels
def test_torch_compile_fullgraph():
    student, target, topk, reference = on_device(*make_inputs(4, 40 if INTERPRETED else 32000, 8, torch.float32))
    backend = "eager" if INTERPRETED else "inductor"  # see test_triton_backend.test_torch_compile_fullgraph

    def loss_fn(s):
        return smskd_fast.smskd_loss(s, target, None, reference, teacher_topk=topk, backend="triton").loss

    assert_compiled_matches_eager(loss_fn, student, backend)


@gpu_only
def test_auto_picks_a_gpu_kernel_for_top_k():
    from smskd_fast.backends.registry import resolve_backend

    chosen = resolve_backend("auto", torch.device("cuda"), torch.bfloat16, 32000, topk=True)
    assert chosen.name in ("triton", "cuda")


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file under TRITON_INTERPRET=1 in a fresh interpreter (see tests/triton_interpreter.py)."""
    run_under_interpreter(__file__)
