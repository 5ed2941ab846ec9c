"""The CUDA top-k kernel's arithmetic run on the CPU, against the float64 reference (no GPU needed).

kernels/tests/topk_rows_host.cu (compiled with nvcc as host code, about 30 s)
runs kernels/smskd_topk_row_kernel.cuh's per-thread work for every thread of a
row in turn, with the merges the shuffles and shared memory do, for every row
layout (8, 16, 32, 256, 512 threads per row), on inputs written here; the
outputs must match tests/topk_cases.py's float64 reference. Warp shuffles,
barriers and the launch itself need a GPU (tests/test_cuda_topk.py). One-class rows
must give exact zeros, also from a build whose host compiler contracts multiply-adds into FMA
as nvcc does on the device. Skipped without nvcc.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from smskd_fast.backends.base import LossOptions
from smskd_fast.backends.topk import TopKTeacher
from conformance_cases import Case, build
from topk_cases import FIELDS, make_inputs, no_rest_mass_case, run_reference
from topk_tolerance import assert_matches_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from cuda_resource_report import find_tool  # noqa: E402

NVCC = find_tool("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit)")

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
from smskd_fast.ops.schema import WEIGHTING_CODES  # noqa: E402  (the C enum's codes)
LAYOUTS = (8, 16, 32, 256, 512)
# (rows, C, k): each layout's range of C, odd C for heads and tails, k = 1, k = C, k > threads per row.
SHAPES = ((5, 1, 1), (6, 7, 3), (6, 7, 7), (5, 100, 10), (4, 129, 40), (4, 513, 64), (3, 2049, 300),
          (3, 5003, 50))
# (target, reference, weighting)
INPUTS = ((True, True, "inverse_tcp"), (True, False, "tcp"), (False, True, "constant"), (False, False, "constant"))


# g++ fuses a * b + c into one rounding only with FMA instructions enabled and contraction allowed.
CONTRACT = ["-Xcompiler", "-mfma", "-Xcompiler", "-ffp-contract=fast"]


def build_host_binary(directory, flags=()):
    binary = directory / "topk_rows_host"
    kernels = os.path.join(ROOT, "kernels")
    subprocess.run([NVCC, "-std=c++17", "-O2", *flags, "-I", kernels,
                    os.path.join(kernels, "tests", "topk_rows_host.cu"), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    return binary


@pytest.fixture(scope="module")
def host_binary(tmp_path_factory):
    return build_host_binary(tmp_path_factory.mktemp("topk_host"))


@pytest.fixture(scope="module")
def contracted_host_binary(tmp_path_factory):
    """The same built with FMA contraction (nvcc's device default), or a skip on a CPU without FMA."""
    try:
        with open("/proc/cpuinfo") as f:
            has_fma = any(line.startswith("flags") and " fma " in line + " " for line in f)
    except OSError:
        has_fma = False
    if not has_fma:
        pytest.skip("no FMA instructions on this CPU (or no /proc/cpuinfo to tell)")
    return build_host_binary(tmp_path_factory.mktemp("topk_host_fma"), CONTRACT)


def raw(tensor):
    """The tensor's bytes, in its own dtype (bfloat16 as its 16-bit pattern)."""
    t = tensor.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def run_host(binary, directory, student, target, topk, reference, options, *, pad, vectorized, grad_scale=None):
    """Writes the case, runs the emulation, returns {threads: (six per-row outputs, grad)}.
    grad_scale: the operators' argument (a float32 the kernel reads), None for none."""
    n, c = student.shape
    directory.mkdir()
    meta = [n, c, topk.k, DTYPE_CODES[student.dtype], int(target is not None), int(reference is not None),
            repr(options.temperature), repr(options.ce_weight), repr(options.kd_weight), repr(options.ref_weight),
            WEIGHTING_CODES[options.weighting], options.ignore_index, pad, int(vectorized)]
    if grad_scale is not None:
        meta.append(repr(grad_scale))
    (directory / "meta.txt").write_text(" ".join(map(str, meta)))
    (directory / "student.bin").write_bytes(raw(student))
    if reference is not None:
        (directory / "reference.bin").write_bytes(raw(reference))
    if target is not None:
        (directory / "target.bin").write_bytes(raw(target.long()))
    (directory / "indices.bin").write_bytes(raw(topk.indices.long()))
    for name, tensor in (("values", topk.values), ("true_logit", topk.true_logit), ("lse", topk.log_sum_exp),
                         ("lse_t", topk.log_sum_exp_at_temperature)):
        (directory / f"{name}.bin").write_bytes(raw(tensor.float()))
    result = subprocess.run([str(binary), str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outputs = {}
    for threads in LAYOUTS:
        rows = torch.from_numpy(np.fromfile(directory / f"rows_{threads}.bin", dtype=np.float32).reshape(6, n))
        grad_bits = np.fromfile(directory / f"grad_{threads}.bin",
                                dtype=np.float32 if student.dtype == torch.float32 else np.int16)
        grad = torch.from_numpy(grad_bits.reshape(n, c))
        if student.dtype != torch.float32:
            grad = grad.view(student.dtype)
        outputs[threads] = (list(rows), grad)
    return outputs


def check_case(binary, directory, student, target, topk, reference, options, *, pad=0, vectorized=True):
    expected, expected_grad = run_reference(student, target, topk, reference, options)
    outputs = run_host(binary, directory, student, target, topk, reference, options, pad=pad, vectorized=vectorized)
    for threads, (per_row, grad) in outputs.items():
        assert_matches_reference(per_row, grad, expected, expected_grad, student, options,
                                 what=f"{threads} threads/row:")
        if target is not None and student.shape[0] > 2:
            assert torch.all(grad[1] == 0) and all(float(v[1]) == 0 for v in per_row)  # the ignored row


CASES = [(dtype, shape, inputs) for dtype in DTYPE_CODES for shape in SHAPES for inputs in INPUTS]


@pytest.mark.parametrize("dtype, shape, inputs", CASES,
                         ids=[f"{str(d)[6:]}-{s[1]}x{s[2]}-{'y' if i[0] else 'noy'}-{'r' if i[1] else 'nor'}"
                              for d, s, i in CASES])
def test_host_math_matches_the_float64_reference(host_binary, tmp_path, dtype, shape, inputs):
    n, c, k = shape
    with_target, with_reference, weighting = inputs
    index = CASES.index((dtype, shape, inputs))
    # In turn over the shapes and inputs, so that each input combination meets every temperature (T = 1 and
    # T = 2 with a target run the kernels that take softmax(s) from the exponentials at T).
    temperature = (4.0, 1.0, 2.5, 2.0)[(index // len(INPUTS) + index) % 4]
    options = LossOptions(temperature=temperature, ce_weight=0.3, kd_weight=0.9, ref_weight=0.7, weighting=weighting)
    student, target, topk, reference = make_inputs(n, c, k, dtype, seed=index, temperature=options.temperature,
                                                   with_target=with_target, with_reference=with_reference)
    # Alternate the row layout in memory: contiguous, misaligned rows, and the scalar path.
    pad, vectorized = ((0, True), (1, True), (3, False))[index % 3]
    check_case(host_binary, tmp_path / "case", student, target, topk, reference, options, pad=pad,
               vectorized=vectorized)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 2.5])
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_a_rest_far_below_the_kept_classes_gives_the_exact_finite_kd(host_binary, tmp_path, dtype, temperature):
    """The student's rest 30-1000 T below its kept classes (conformance_cases.FAR_REST_GAPS): the rest's sum at
    the row maximum underflows from about 87 T (KD = inf, NaN gradient, before the rare sweep at the rest's own
    maximum), the exact KD is finite and large; every layout matches the float64 reference, KD to 1e-5 and the
    gradient entrywise to its dtype's rounding."""
    case = Case("topk_far_rest", 5, 513, dtype, k=20, seed=21, temperature=temperature, weights=(0.5, 1.0, 0.7),
                edit="student_rest_far_below")
    inputs = build(case)
    options = case.options()
    expected, expected_grad = run_reference(inputs.student, inputs.target, inputs.topk, inputs.reference, options)
    outputs = run_host(host_binary, tmp_path / "case", inputs.student, inputs.target, inputs.topk, inputs.reference,
                       options, pad=1, vectorized=True)
    for threads, (per_row, grad) in outputs.items():
        what = f"{threads} threads/row:"
        assert all(torch.isfinite(v).all() for v in per_row) and torch.isfinite(grad.float()).all(), what
        assert_matches_reference(per_row, grad, expected, expected_grad, inputs.student, options, what=what)
        torch.testing.assert_close(per_row[FIELDS.index("kd")].double(), expected.kd.detach(), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{what} kd: {m}")
        # The gradient entrywise to its own size (the logits' far shift makes assert_matches_reference's atol
        # large): the dtype's rounding of it, or fp32 arithmetic on entries near 1
        rounding = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
        torch.testing.assert_close(grad.double(), expected_grad, rtol=rounding, atol=2e-6,
                                   msg=lambda m: f"{what} gradient entrywise: {m}")


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_a_reference_far_from_the_student_keeps_the_reference_term_exact(host_binary, tmp_path, temperature):
    """The reference's rows 5e5 below the student's (softmax ignores a shift, so the term is that of the rows
    unshifted): every layout matches the float64 reference to the usual tolerance, which follows the student's
    logits. Summing p (r - s) instead of p ((r - max_r) - (s - max_s)) rounded to the spacing of 5e5 (0.03)."""
    options = LossOptions(temperature=temperature, ce_weight=0.3, kd_weight=0.9, ref_weight=0.7, weighting="constant")
    student, target, topk, reference = make_inputs(4, 513, 20, torch.float32, seed=5, temperature=temperature,
                                                   with_target=True, with_reference=True)
    check_case(host_binary, tmp_path / "case", student, target, topk, reference - 5e5, options, pad=1,
               vectorized=True)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("c, k, temperature", [(300, 5, 4.0), (5000, 37, 2.0)])
def test_a_student_masked_where_the_reference_holds_its_lowest_gives_finite_terms(host_binary, tmp_path, dtype, c,
                                                                                  k, temperature):
    """The student -inf where the dense reference holds its dtype's lowest finite value or -1e4
    (conformance_cases' student_masked_where_frozen_lowest): those classes have probability 0, so every layout
    gives the float64 reference's finite reference term (a +inf cross dot rescaled by 0 must give 0)."""
    case = Case("topk_student_masked", 5, c, dtype, k=k, seed=c, temperature=temperature, weights=(0.5, 1.0, 0.7),
                edit="student_masked_where_frozen_lowest")
    inputs = build(case)
    expected, _ = run_reference(inputs.student, inputs.target, inputs.topk, inputs.reference, case.options())
    assert torch.isfinite(expected.ref).all()  # the case is what it claims: the student -inf where r is finite
    assert (torch.isneginf(inputs.student) & torch.isfinite(inputs.reference)).any()
    check_case(host_binary, tmp_path / "case", inputs.student, inputs.target, inputs.topk, inputs.reference,
               case.options(), pad=1, vectorized=True)


@pytest.mark.parametrize("c, k", [(300, 5), (2049, 37)])
def test_ignored_rows_top_k_fields_are_not_read(host_binary, tmp_path, c, k):
    """Padding rows (ignored) holding conformance_cases.PADDING_FILLS, indices clamped into [0, C) as the op
    does: every layout gives the clean cache's outputs and gradient bit for bit, and zeros there."""
    case = Case("topk_padding", 12, c, torch.float32, k=k, seed=c, temperature=2.0, weights=(0.5, 1.0, 0.7),
                edit="padding_rows")
    runs = []
    for name, inputs in (("padded", build(case)), ("clean", build(dataclasses.replace(case, edit="")))):
        runs.append(run_host(host_binary, tmp_path / name, inputs.student, inputs.target, inputs.topk,
                             inputs.reference, case.options(), pad=1, vectorized=True))
    ignored = inputs.target == case.ignore_index
    assert ignored.sum() == 3
    for threads, (per_row, grad) in runs[0].items():
        clean_per_row, clean_grad = runs[1][threads]
        assert all(torch.equal(a, b) for a, b in zip(per_row, clean_per_row)), f"{threads} threads/row"
        assert torch.equal(bits(grad), bits(clean_grad)), f"{threads} threads/row"
        assert (grad[ignored] == 0).all() and all((v[ignored] == 0).all() for v in per_row)


# (dtype, (rows, C, k), target and reference, grad_scale): C = 1, the rest and no rest, every dtype;
# powers of two (exact in float32), a mean's 1/3 and a factor above 1.
SCALE_CASES = [(dtype, shape, both, scale) for dtype in DTYPE_CODES
               for shape, both, scale in (((5, 1, 1), True, 0.25), ((6, 7, 7), False, 1 / 3), ((4, 513, 64), True, -0.5),
                                          ((3, 2049, 300), False, 3.5))]


def bits(tensor):
    """The tensor's bit patterns (NaN and -0.0 compared exactly)."""
    return tensor.view(torch.int32 if tensor.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype, shape, both, scale", SCALE_CASES,
                         ids=[f"{str(d)[6:]}-{s[1]}x{s[2]}-{g:g}" for d, s, _, g in SCALE_CASES])
def test_grad_scale_scales_the_gradient_and_nothing_else(host_binary, tmp_path, dtype, shape, both, scale):
    """With grad_scale the gradient written is grad_scale times the float64 reference's, the per-row
    outputs are those without it; for a power of two it is exactly grad_scale times the unscaled gradient
    (wherever both are in the dtype's normal range), and grad_scale 1 gives the unscaled bits."""
    n, c, k = shape
    options = LossOptions(temperature=2.5, ce_weight=0.3, kd_weight=0.9, ref_weight=0.7,
                          weighting="inverse_tcp" if both else "constant")
    student, target, topk, reference = make_inputs(n, c, k, dtype, seed=c, temperature=options.temperature,
                                                   with_target=both, with_reference=both)
    scale32 = float(torch.tensor(scale, dtype=torch.float32))  # what the kernel reads
    expected, expected_grad = run_reference(student, target, topk, reference, options)
    args = (student, target, topk, reference, options)
    unscaled = run_host(host_binary, tmp_path / "none", *args, pad=1, vectorized=True)
    scaled = run_host(host_binary, tmp_path / "scaled", *args, pad=1, vectorized=True, grad_scale=scale)
    one = run_host(host_binary, tmp_path / "one", *args, pad=1, vectorized=True, grad_scale=1.0)
    for threads in LAYOUTS:
        (rows0, grad0), (rows1, grad1) = unscaled[threads], scaled[threads]
        what = f"{threads} threads/row, grad_scale {scale:g}:"
        assert_matches_reference(rows1, grad1, expected, expected_grad, student, options, what=what,
                                 grad_scale=scale32)
        assert all(torch.equal(a, b) for a, b in zip(rows0, rows1)), what  # outputs unscaled, bit for bit
        assert torch.equal(bits(one[threads][1]), bits(grad0)), what
        if abs(scale) <= 1:  # a 0 (C = 1's exact one, or an underflow) stays 0
            assert torch.all(grad1[grad0 == 0] == 0), what
        if math.frexp(abs(scale))[0] == 0.5:  # a power of two: scaling the coefficients is exact
            want = grad0.double() * scale
            normal = torch.minimum(want.abs(), grad0.double().abs()) > torch.finfo(dtype).tiny
            assert torch.equal(grad1.double()[normal], want[normal]), what


@pytest.mark.parametrize("contracted", [False, True], ids=["plain", "fma-contracted"])
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_one_class_rows_give_exact_zeros(request, tmp_path, dtype, contracted):
    """C = k = 1: softmax is exactly 1, so every loss term and the gradient are exactly 0 (and the
    teacher's true-class probability exactly 1), for every input combination, layout and a temperature
    whose reciprocal is not a power of two, whether or not multiply-adds are contracted."""
    binary = request.getfixturevalue("contracted_host_binary" if contracted else "host_binary")
    for temperature in (1.0, 2.0, 2.5, 4.0):
        for index, (with_target, with_reference, weighting) in enumerate(INPUTS):
            options = LossOptions(temperature=temperature, ce_weight=0.3, kd_weight=0.9, ref_weight=0.7,
                                  weighting=weighting)
            student, target, topk, reference = make_inputs(5, 1, 1, dtype, seed=index, temperature=temperature,
                                                           with_target=with_target, with_reference=with_reference)
            outputs = run_host(binary, tmp_path / f"t{temperature}_{index}", student, target, topk, reference,
                               options, pad=index % 2, vectorized=True)
            for threads, (per_row, grad) in outputs.items():
                what = f"T={temperature} target={with_target} reference={with_reference} {threads} threads/row"
                for name in ("loss", "ce", "kd", "ref"):
                    value = per_row[FIELDS.index(name)]
                    assert torch.count_nonzero(value) == 0, f"{what}: {name} {value.tolist()}"
                assert torch.count_nonzero(grad) == 0, f"{what}: grad {grad.flatten().tolist()}"
                if target is not None:
                    tcp = per_row[FIELDS.index("tcp")][target != options.ignore_index]
                    assert bool((tcp == 1).all()), f"{what}: tcp {tcp.tolist()}"


def test_no_rest_mass_and_masked_student_classes(host_binary, tmp_path):
    """p_rest = 0 (the kept classes hold all the teacher's mass), and -inf student logits off the kept classes."""
    student, target, _, reference = make_inputs(4, 40, 2, torch.float32, seed=7)
    teacher = torch.full((4, 40), -1e4, dtype=torch.float32)
    teacher[:, :2] = torch.tensor([3.0, 1.0])
    options = LossOptions(temperature=1.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.3, weighting="constant")
    topk = TopKTeacher.from_logits(teacher, target, 2, options.temperature)
    check_case(host_binary, tmp_path / "no_rest", student, target, topk, reference, options)
    masked = student.clone()
    masked[:, 30:] = float("-inf")  # q = 0 there: no gradient, no share of the rest
    target = target.clamp(max=29).masked_fill(target == -100, -100)
    teacher = torch.randn(4, 40, generator=torch.Generator().manual_seed(3))
    teacher[:, 30:] -= 100.0  # the kept classes lie among the finite student logits
    options = LossOptions(temperature=2.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.0, weighting="constant")
    topk = TopKTeacher.from_logits(teacher, target, 5, options.temperature)
    check_case(host_binary, tmp_path / "masked", masked, target, topk, None, options)


def test_the_comparison_catches_a_small_error(host_binary, tmp_path):
    """The comparison can fail: outputs off by 0.1 % are refused."""
    student, target, topk, reference = make_inputs(5, 100, 10, torch.float32, seed=1)
    options = LossOptions(temperature=4.0, ce_weight=0.3, kd_weight=0.9, ref_weight=0.7)
    expected, expected_grad = run_reference(student, target, topk, reference, options)
    outputs = run_host(host_binary, tmp_path / "case", student, target, topk, reference, options, pad=0,
                       vectorized=True)
    per_row, grad = outputs[32]
    wrong = list(per_row)
    wrong[2] = per_row[2] * (1 + 1e-3)
    with pytest.raises(AssertionError):
        assert_matches_reference(wrong, grad, expected, expected_grad, student, options)
    with pytest.raises(AssertionError):
        assert_matches_reference(per_row, grad * (1 + 1e-3), expected, expected_grad, student, options)


def test_no_student_mass_off_the_kept_classes_gives_what_the_cpu_kernel_gives(host_binary, tmp_path):
    """R = 0 (every non-kept student logit is -inf): an infinite rest term and NaN gradients off the kept
    classes, as csrc/cpu/loss_rows_topk.cpp gives (the float64 reference is not finite here either)."""
    import smskd_fast  # noqa: PLC0415

    if not smskd_fast.available_backends()["cpu"]:
        pytest.skip("the C++ CPU kernel (the oracle of this case) is not built")
    student, target, topk, options = no_rest_mass_case()
    want = torch.ops.smskd_fast.smskd_loss_rows_topk(
        student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
        topk.log_sum_exp_at_temperature, None, options.temperature, options.ce_weight, options.kd_weight,
        options.ref_weight, options.weighting, options.ignore_index, True)
    assert torch.isinf(want[2][0]) and torch.isnan(want[6][0]).any()  # the case is what it claims
    outputs = run_host(host_binary, tmp_path / "case", student, target, topk, None, options, pad=0, vectorized=True)
    for threads, (per_row, grad) in outputs.items():
        for name, got, expected in zip(FIELDS + ("grad",), per_row + [grad], want):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True,
                                       msg=lambda m: f"{threads} threads/row {name}: {m}")


def test_a_nan_teacher_value_gives_a_nan_row_not_a_dropped_class(host_binary, tmp_path):
    """A NaN among a row's kept values (a broken cache row) makes that row's KD, loss and gradient NaN,
    as the reference gives (topk.py: p != 0 holds for NaN); the other rows match the reference."""
    student, target, topk, _ = make_inputs(4, 100, 10, torch.float32, seed=11, temperature=2.0)
    values = topk.values.clone()
    values[2, 3] = float("nan")
    topk = TopKTeacher(values, topk.indices, topk.true_logit, topk.log_sum_exp, topk.log_sum_exp_at_temperature)
    options = LossOptions(temperature=2.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.0)
    expected, expected_grad = run_reference(student, target, topk, None, options)
    assert torch.isnan(expected.kd[2]) and torch.isnan(expected_grad[2]).all()  # the case is what it claims
    keep = torch.tensor([0, 1, 3])
    outputs = run_host(host_binary, tmp_path / "case", student, target, topk, None, options, pad=0, vectorized=True)
    for threads, (per_row, grad) in outputs.items():
        kd, loss = per_row[FIELDS.index("kd")], per_row[FIELDS.index("loss")]
        assert torch.isnan(kd[2]) and torch.isnan(loss[2]), f"{threads} threads/row"
        assert torch.isnan(grad[2]).all(), f"{threads} threads/row"
        for name, got in zip(FIELDS, per_row):
            torch.testing.assert_close(got[keep].double(), getattr(expected, name)[keep].double(), rtol=5e-5,
                                       atol=5e-5, msg=lambda m: f"{threads} threads/row {name}: {m}")


@pytest.mark.parametrize("columns", [(5, 2000), (2000, 5), (5, 6)], ids=["nan first", "inf first", "one pack"])
def test_a_nan_beside_a_plus_inf_student_logit_gives_a_nan_row(host_binary, tmp_path, columns):
    """A student row holding a NaN and a +inf: CE and loss NaN, as the reference gives, and a non-finite gradient
    row, in every layout and whichever part of the row each lies in (a maximum that skipped the NaN, fmaxf's,
    took the +inf and the +inf guard gave CE +inf); the other rows match the reference."""
    student, target, topk, reference = make_inputs(4, 2049, 40, torch.float32, seed=12, temperature=2.0)
    student[2, columns[0]], student[2, columns[1]] = float("nan"), float("inf")
    target[2] = 1000
    options = LossOptions(temperature=2.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.7)
    expected, _ = run_reference(student, target, topk, reference, options)
    assert torch.isnan(expected.ce[2]) and torch.isnan(expected.loss[2])  # the case is what it claims
    keep = torch.tensor([0, 1, 3])
    outputs = run_host(host_binary, tmp_path / "case", student, target, topk, reference, options, pad=0,
                       vectorized=True)
    for threads, (per_row, grad) in outputs.items():
        ce, loss = per_row[FIELDS.index("ce")], per_row[FIELDS.index("loss")]
        assert torch.isnan(ce[2]) and torch.isnan(loss[2]), f"{threads} threads/row: ce {ce[2]}, loss {loss[2]}"
        assert not torch.isfinite(grad[2]).all(), f"{threads} threads/row: a finite gradient row"
        for name, got in zip(FIELDS, per_row):
            torch.testing.assert_close(got[keep].double(), getattr(expected, name)[keep].double(), rtol=5e-5,
                                       atol=5e-5, msg=lambda m: f"{threads} threads/row {name}: {m}")
