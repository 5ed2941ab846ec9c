"""The triton backend's top-k form (smskd_loss_rows_topk_triton): forced launch configurations, the in-place
gradient, errors, the kept-class bitmask, op registration.

The value and gradient cases every backend shares (k grids, wide rows, optional inputs,
C = 1, strided rows, no rest, an infinite rest term, NaN kept values, half precision,
leading dimensions) are in tests/test_backend_conformance.py.
Oracle: the reference backend's top-k form in float64 (tests/topk_cases.py);
torch.library.opcheck. Where the cases run is tests/triton_interpreter.py.
Tolerances: tests/tolerances.py (backend_tolerance("triton", ...)).
"""
from __future__ import annotations

import pytest
import torch

import smskd_fast
from smskd_fast.backends.base import LossOptions
from smskd_fast.backends.topk import TopKTeacher
from test_triton_backend import assert_compiled_matches_eager, assert_rows_match, triton_tolerance
from conformance_cases import Case, build
from topk_cases import FIELDS, make_inputs, run_reference
from triton_interpreter import DEVICE, INTERPRETED, gpu_only, needs_kernels, reruns_under_interpreter, \
    run_under_interpreter



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
def test_a_nan_teacher_value_in_forced_column_blocks_gives_a_nan_row():
    """A NaN kept value makes that row's KD, loss and gradient NaN, as the reference gives (topk.py:
    p != 0 holds for NaN), in forced 64-column blocks; the other rows match the reference. The launch
    table's kernel: test_backend_conformance.py (topk_nan)."""
    c = 300
    from smskd_fast.backends.triton import topk_launch as triton_topk_launch

    student, target, topk, _ = make_inputs(4, c, 3, torch.float32, seed=6, temperature=2.0)
    values = topk.values.clone()
    values[2, 1] = float("nan")
    topk = TopKTeacher(values, topk.indices, topk.true_logit, topk.log_sum_exp, topk.log_sum_exp_at_temperature)
    options = LossOptions(temperature=2.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.0, weighting="constant")
    expected, expected_grad = run_reference(student, target, topk, None, options)
    assert torch.isnan(expected.kd[2]) and torch.isnan(expected_grad[2]).all()  # the case is what it claims
    student, target, topk, _ = on_device(student, target, topk, None)
    outputs = [t.cpu() for t in triton_topk_launch.launch_topk_rows(
        student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
        topk.log_sum_exp_at_temperature, None, options.temperature, options.ce_weight, options.kd_weight,
        options.ref_weight, options.weighting, options.ignore_index, True,
        config=triton_topk_launch.TopKConfig(64, 4, False))]
    kd, loss, grad = outputs[FIELDS.index("kd")], outputs[FIELDS.index("loss")], outputs[6]
    assert torch.isnan(kd[2]) and torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    keep = torch.tensor([0, 1, 3])
    value_tol, grad_tol = triton_tolerance()
    for name, got in zip(FIELDS, outputs):
        torch.testing.assert_close(got[keep].double(), getattr(expected, name)[keep].double(), **value_tol)
    torch.testing.assert_close(grad[keep].double(), expected_grad[keep], **grad_tol)


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
    value_tol, grad_tol = triton_tolerance()
    torch.testing.assert_close(out.loss, expected.loss, **value_tol)
    torch.testing.assert_close(logits_leaf.grad, leaf.grad, **grad_tol)
    assert logits.data_ptr() == storage
    torch.testing.assert_close(logits.detach(), leaf.grad, **grad_tol)


@needs_kernels
@pytest.mark.parametrize("c", [300, 5000])
def test_a_far_rest_row_in_place_is_redone_from_intact_logits(c):
    """overwrite_student_logits with rows whose rest lies far below the kept classes: the first launch writes
    no gradient for them (the exact-rest pass reads their logits), so the in-place gradient matches the float64
    reference; c = 300 a whole row, 5000 column blocks."""
    case = Case("topk_far_rest", 5, c, torch.float32, k=7, seed=c, temperature=1.0, weights=(0.5, 1.0, 0.7),
                edit="student_rest_far_below")
    inputs = build(case)
    student, target, topk, reference = on_device(inputs.student, inputs.target, inputs.topk, inputs.reference)
    leaf = student.detach().double().requires_grad_()
    expected = smskd_fast.smskd_loss(leaf, target, None, reference.double(), teacher_topk=topk, temperature=1.0,
                                     ce_weight=0.5, ref_weight=0.7, backend="reference", reduction="sum")
    expected.loss.backward()

    logits_leaf = student.detach().clone().requires_grad_()
    logits = logits_leaf * 1.0
    out = smskd_fast.smskd_loss(logits, target, None, reference, teacher_topk=topk, temperature=1.0,
                                ce_weight=0.5, ref_weight=0.7, backend="triton", reduction="sum",
                                overwrite_student_logits=True)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logits_leaf.grad).all()
    value_tol, grad_tol = triton_tolerance()
    torch.testing.assert_close(out.loss.double(), expected.loss, **value_tol)
    torch.testing.assert_close(logits_leaf.grad.double(), leaf.grad, **grad_tol)


@needs_kernels
def test_float64_is_refused_with_the_alternatives():
    student, target, topk, reference = on_device(*make_inputs(3, 5, 2, torch.float64))
    with pytest.raises(TypeError, match=r"use backend='reference' for float64 \(or 'cpu' for CPU tensors\)"):
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
