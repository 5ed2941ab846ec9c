"""Every backend against the float64 reference backend, on the same cases (tests/conformance_cases.py).

Each case runs through the public API (smskd_loss, kd_loss; a backend's rows() where the
API has no form for it: no target with a reference or a top-k teacher) on cpu, triton and
cuda, and through the pure-PyTorch reference in float64 on the same, exactly upcast,
values: per-row values, their dtype, the gradient (by autograd through the reference),
exact zeros on ignored rows. Tolerances: tests/tolerances.py (backend_tolerance).

Where each backend runs: cpu here when its C++ op is built; cuda on a GPU with a CUDA
build (skipped otherwise, with the reason); triton on a GPU in this process, or without
one under Triton's interpreter in a subprocess (test_triton_cases_under_the_interpreter,
see tests/triton_interpreter.py), there only on cases of at most INTERPRETER_MAX_LOGITS
logits.
"""
from __future__ import annotations

import pytest
import torch

import smskd_fast
from smskd_fast.backends.base import RowInputs
from smskd_fast.backends.reference import ReferenceBackend
from smskd_fast.backends.registry import get_backend
from smskd_fast.backends.topk import TopKTeacher
from conformance_cases import F64, FIELDS, Case, build, dense_cases, on_device, topk_cases
from tolerances import backend_tolerance, cross_backend_tolerance
from topk_cases import no_rest_mass_case
from triton_interpreter import DEVICE, INTERPRETED, ON_GPU, reruns_under_interpreter, run_under_interpreter

BACKENDS = ("cpu", "triton", "cuda")
INTERPRETER_MAX_LOGITS = 25_000  # Triton's interpreter takes about a second per case of this size
# Groups sized for a GPU: under the interpreter only their float32 cases run (the rows, half and topk_rows,
# topk_half groups run bfloat16 and float16 there).
GPU_SCALE_GROUPS = ("ladder", "temperature_ladder", "topk_ladder")
# R = 0 with p_rest > 0: KD = +inf, whose gradient is undefined (the reference's autograd gives NaN where
# the kernels give numbers); test_infinite_rest_term_matches_the_cpu_kernel compares those with the cpu's.
EDITS_WITH_INFINITE_LOSS = ("student_rest_masked",)
EDITS_WITH_FINITE_RESULTS = ("masked_blocks", "masked_every_third", "masked_teacher_reference", "all_equal",
                             "no_rest", "sure_teacher", "student_rest_far_below", "padding_rows", "far_shifted",
                             "masked_with_lowest", "student_masked_where_frozen_lowest")


def device_of(backend: str) -> str:
    return {"cpu": "cpu", "triton": DEVICE, "cuda": "cuda"}[backend]


def skip_reason(backend: str, dtype: torch.dtype = torch.float32, logits: int = 0, group: str = "") -> str | None:
    """Why backend cannot run such a case (of `logits` logits, in the group `group`) here, or None."""
    if backend == "triton":
        if not (INTERPRETED or ON_GPU):
            return ("no CUDA device here: the triton cases run on CPU tensors under TRITON_INTERPRET=1 in a "
                    "subprocess, see test_triton_cases_under_the_interpreter")
        if dtype == F64:
            return "triton refuses float64 (test_triton_backend.py checks the error)"
        if INTERPRETED and logits > INTERPRETER_MAX_LOGITS:
            return f"more than {INTERPRETER_MAX_LOGITS} logits: too slow for Triton's interpreter, runs on a GPU"
        if INTERPRETED and group in GPU_SCALE_GROUPS and dtype != torch.float32:
            return f"{group}: its half-precision cases run on a GPU (too many for Triton's interpreter)"
        return None
    if INTERPRETED:
        return "this run under TRITON_INTERPRET=1 is for the triton cases; the others ran in the parent process"
    status = smskd_fast.available_backends()[backend]
    if not status:
        return f"{backend} backend unavailable: {status.reason}"
    if backend == "cuda" and dtype == F64:
        return "cuda refuses float64 (test_cuda_backend.py checks the error)"
    return None


def skip_unless_runs(backend: str, dtype: torch.dtype = torch.float32, logits: int = 0, group: str = "") -> None:
    reason = skip_reason(backend, dtype, logits, group)
    if reason:
        pytest.skip(reason)


def run(backend: str, inputs, case: Case, student_dtype=None):
    """Per-row outputs {field: (N,)} and d(sum_i v_i L_i)/d student (v_i = 1 unless case.row_weights).
    backend "reference" is the float64 oracle, on the inputs' device (the GPU's float64 is exact too)."""
    options = case.options()
    student = inputs.student.detach()
    if backend == "reference":
        def up(x):
            return None if x is None else x.detach().double()

        student = up(student)
        teacher, reference, target = up(inputs.teacher), up(inputs.reference), inputs.target
        topk = None if inputs.topk is None else TopKTeacher(*(
            up(t) if t.is_floating_point() else t for t in inputs.topk.tensors()))
    else:
        teacher, reference, target, topk = inputs.teacher, inputs.reference, inputs.target, inputs.topk
    student = student.requires_grad_(True)
    if backend == "reference":
        rows = ReferenceBackend().rows(as_rows(student, target, teacher, reference, topk), options)
        outputs = {name: getattr(rows, name) for name in FIELDS}
    elif case.inputs == "kd_only" and not case.topk:
        outputs = {"loss": smskd_fast.kd_loss(student, teacher, temperature=options.temperature, reduction="none",
                                              backend=backend)}
    elif target is None:  # no public API form: the backend's rows() itself
        rows = get_backend(backend, student.device, topk=case.topk).rows(
            as_rows(student, None, teacher, reference, topk), options)
        outputs = {name: getattr(rows, name) for name in FIELDS}
    else:
        out = smskd_fast.smskd_loss(
            student, target, teacher, reference, teacher_topk=topk, temperature=options.temperature,
            ce_weight=options.ce_weight, kd_weight=options.kd_weight, ref_weight=options.ref_weight,
            weighting=options.weighting, ignore_index=options.ignore_index, reduction="none", backend=backend)
        outputs = {name: getattr(out, name) for name in FIELDS}
    loss = outputs["loss"].reshape(-1)
    v = row_weights(loss.numel(), loss.device, loss.dtype) if case.row_weights else torch.ones_like(loss)
    (grad,) = torch.autograd.grad((loss * v).sum(), student)
    return outputs, grad


def as_rows(student, target, teacher, reference, topk) -> RowInputs:
    """The inputs flattened to rows, as the loss API hands them to a backend."""
    c = student.shape[-1]

    def rows(x):
        return None if x is None else x.reshape(-1, c)

    return RowInputs(rows(student), None if target is None else target.reshape(-1), rows(teacher), rows(reference),
                     None if topk is None else topk.rows())


def row_weights(n: int, device, dtype) -> torch.Tensor:
    """v_i in [0.5, 1.5], exact in fp32 and float64 alike."""
    return torch.linspace(0.5, 1.5, n, dtype=torch.float32).to(device=device, dtype=dtype)


def assert_conforms(backend: str, case: Case) -> None:
    """backend's per-row outputs and gradient on case match the float64 reference's (module docstring)."""
    skip_unless_runs(backend, case.dtype, case.n * case.c, case.name)
    cpu_inputs = build(case)
    inputs = on_device(cpu_inputs, case, device_of(backend))
    got, grad = run(backend, inputs, case)
    want, want_grad = run("reference", inputs, case)

    n, c = case.n, case.c
    student = cpu_inputs.student.double()
    max_abs = float(student.nan_to_num(0, 0, 0).abs().max()) if student.numel() else 0.0
    o = case.options()
    values_tol, grad_tol = backend_tolerance(
        backend, case.dtype, temperature=o.temperature, num_classes=c, topk=case.topk,
        row_weights=case.row_weights, max_abs_logit=max_abs, weight_sum=o.ce_weight + o.kd_weight + o.ref_weight,
        grad_scale=(o.ce_weight + o.temperature * (o.kd_weight + o.ref_weight)) * (1.5 if case.row_weights else 1.0))
    accumulation = torch.float64 if case.dtype == F64 else torch.float32
    leading = case.leading or (n,)
    for name, value in got.items():
        assert value.dtype == accumulation and tuple(value.shape) == tuple(leading), (name, value.dtype, value.shape)
        torch.testing.assert_close(value.detach().cpu().double().reshape(-1), want[name].detach().cpu().reshape(-1),
                                   equal_nan=True, **values_tol, msg=lambda m: f"{case.id} {name}: {m}")
    assert grad.dtype == case.dtype and grad.shape == inputs.student.shape
    grad = grad.detach().cpu().double().reshape(-1, c)
    if case.edit.startswith("nan"):  # the case is what it claims
        assert torch.isnan(want["loss"].reshape(-1)[2]) != (case.edit == "nan_ignored_row")
    if case.edit == "student_rest_far_below":  # the case is what it claims: the rest's fp32 sum at the maximum
        # underflows (0 or subnormal) in some row
        s32 = cpu_inputs.student.float()
        rest = torch.ones_like(s32, dtype=torch.bool).scatter(1, cpu_inputs.topk.indices.long(), False)
        at_max = ((s32 - s32.amax(1, keepdim=True)) / o.temperature).exp().masked_fill(~rest, 0).sum(1)
        assert (at_max < torch.finfo(torch.float32).tiny).any()
    if case.edit == "padding_rows":  # the case is what it claims: ignored rows with repeated and outside indices
        padding = cpu_inputs.topk.indices[cpu_inputs.target == case.ignore_index]
        assert (padding[:, 0] == padding[:, -1]).any()
        assert ((padding < 0) | (padding >= c)).any()
    if case.edit == "student_masked_where_frozen_lowest":  # the case is what it claims: the student's -inf
        # where the reference holds finite logits
        assert (torch.isneginf(cpu_inputs.student) & torch.isfinite(cpu_inputs.reference)).any()
    if case.edit in EDITS_WITH_INFINITE_LOSS:
        assert torch.isinf(want["kd"][cpu_inputs.target != case.ignore_index]).all()  # the case is what it claims
    else:
        torch.testing.assert_close(grad, want_grad.cpu().reshape(-1, c), equal_nan=True, **grad_tol,
                                   msg=lambda m: f"{case.id} gradient: {m}")
    if cpu_inputs.target is not None:  # ignored rows: exactly zero
        ignored = cpu_inputs.target == case.ignore_index
        for name, value in got.items():
            assert (value.detach().cpu().reshape(-1)[ignored] == 0).all(), (name, "ignored row")
        assert (grad[ignored] == 0).all(), "gradient of an ignored row"
    if case.edit in EDITS_WITH_FINITE_RESULTS:
        assert all(torch.isfinite(v).all() for v in got.values()) and torch.isfinite(grad).all()
    if case.edit.startswith("masked"):  # masked in all three inputs: no gradient there
        masked = torch.isinf(cpu_inputs.student).all(0)
        if cpu_inputs.teacher is not None and cpu_inputs.reference is not None:
            masked &= torch.isinf(cpu_inputs.teacher).all(0) & torch.isinf(cpu_inputs.reference).all(0)
        assert (grad[:, masked] == 0).all()


DENSE = dense_cases()
TOPK = topk_cases()


@pytest.mark.parametrize("case", DENSE, ids=[case.id for case in DENSE])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_teacher_matches_reference(backend, case):
    assert_conforms(backend, case)


@pytest.mark.parametrize("case", TOPK, ids=[case.id for case in TOPK])
@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_teacher_matches_reference(backend, case):
    assert_conforms(backend, case)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_class_gives_exact_zeros(backend, dtype):
    """C = 1: softmax is exactly 1, so every loss term and the gradient are exactly 0 (and the teacher's
    true-class probability exactly 1), not a rounding residue of lse(s) - s."""
    skip_unless_runs(backend, dtype)
    for temperature in (1.0, 2.0, 2.5, 4.0):  # 1 and 2: the kernels that square or reuse the exponentials at T
        cases = [Case("one_class", 64, 1, dtype, inputs, temperature=temperature, row_weights=True)
                 for inputs in ("smskd", "smskd_tcp", "ce_kd", "ce_ref", "ce_only", "kd_only", "ref_only")]
        cases += [Case("one_class", 64, 1, dtype, inputs, k=1, temperature=temperature)
                  for inputs in ("target+reference", "target", "reference", "neither")]
        for case in cases:
            cpu_inputs = build(case)
            got, grad = run(backend, on_device(cpu_inputs, case, device_of(backend)), case)
            for name, value in [(name, got[name]) for name in ("loss", "ce", "kd", "ref") if name in got] + [
                    ("gradient", grad)]:
                assert torch.count_nonzero(value).item() == 0, (case.id, name, value[value != 0][:5].tolist())
            if cpu_inputs.target is not None and case.present[1]:
                valid = (cpu_inputs.target != case.ignore_index).to(got["tcp"].device)
                assert bool((got["tcp"][valid] == 1).all()), (case.id, "tcp")


@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_over_leading_dimensions(backend, dtype, reduction, topk):
    """(2, 3, C) inputs with an ignored row: every reduction, and kd_loss's mean, match the reference."""
    skip_unless_runs(backend, dtype)
    case = Case("reductions", 6, 50, dtype, k=4 if topk else None, temperature=3.0 if topk else 2.0,
                weights=(1.0, 1.0, 1.0), leading=(2, 3), row_weights=True)
    inputs = on_device(build(case), case, device_of(backend))
    max_abs = float(inputs.student.double().abs().max())
    values_tol, grad_tol = backend_tolerance(backend, dtype, temperature=case.temperature, num_classes=case.c,
                                             topk=topk, row_weights=True, max_abs_logit=max_abs, weight_sum=3.0,
                                             grad_scale=1 + 2 * case.temperature)
    results = {}
    for name in (backend, "reference"):
        def cast(x):
            return x if x is None or name == backend else x.detach().cpu().double()

        s = cast(inputs.student).detach().clone().requires_grad_(True)
        topk_teacher = inputs.topk if name == backend or not topk else TopKTeacher(*(
            cast(t) if t.is_floating_point() else t.cpu() for t in inputs.topk.tensors()))
        target = inputs.target if name == backend else inputs.target.cpu()
        out = smskd_fast.smskd_loss(s, target, cast(inputs.teacher), cast(inputs.reference), teacher_topk=topk_teacher,
                                    temperature=case.temperature, reduction=reduction, backend=name)
        (grad,) = torch.autograd.grad(out.loss.sum(), s)
        kd = None
        if not topk:
            t = cast(inputs.teacher)
            kd = smskd_fast.kd_loss(s.detach(), t, temperature=case.temperature, reduction=reduction, backend=name)
        results[name] = (out, grad, kd)
    (got, got_grad, got_kd), (want, want_grad, want_kd) = results[backend], results["reference"]
    scale = 6 if reduction == "sum" else 1  # a sum of six rows' errors
    value_tol = dict(rtol=values_tol["rtol"], atol=values_tol["atol"] * scale)
    for name in FIELDS:
        assert getattr(got, name).shape == getattr(want, name).shape, name
        torch.testing.assert_close(getattr(got, name).cpu().double(), getattr(want, name), **value_tol, msg=name)
    if got_kd is not None:
        torch.testing.assert_close(got_kd.cpu().double(), want_kd, **value_tol)
    torch.testing.assert_close(got_grad.cpu().double(), want_grad, **grad_tol)


@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_give_zero_loss_and_gradient(backend, topk):
    """The mean over no valid row is 0 (not NaN), with a zero gradient; TCP and w are 0 on every row."""
    for n, c, dtype, ignore_index in ((4, 5, torch.float32, -7), (6, 90, torch.float32, -100),
                                      (8, 300, torch.bfloat16, -100), (4, 4100, torch.float32, -7)):
        skip_unless_runs(backend, dtype, n * c)
        case = Case("all_ignored", n, c, dtype, k=3 if topk else None, ignore_index=ignore_index, edit="all_ignored")
        inputs = on_device(build(case), case, device_of(backend))
        s = inputs.student.detach().requires_grad_(True)
        out = smskd_fast.smskd_loss(s, inputs.target, inputs.teacher, inputs.reference, teacher_topk=inputs.topk,
                                    ignore_index=ignore_index, backend=backend)
        (grad,) = torch.autograd.grad(out.loss, s)
        assert out.loss.item() == 0.0, case.id
        assert torch.count_nonzero(grad).item() == 0, case.id
        assert torch.count_nonzero(out.tcp).item() == 0 and torch.count_nonzero(out.weight).item() == 0, case.id


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    skip_unless_runs(backend)
    device = device_of(backend)
    student = torch.empty(0, 10, device=device, requires_grad=True)
    out = smskd_fast.smskd_loss(student, torch.empty(0, dtype=torch.long, device=device), student.detach(),
                                backend=backend, reduction="sum")
    out.loss.backward()
    assert out.loss.item() == 0.0 and student.grad.shape == (0, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_rest_term_matches_the_cpu_kernel(backend):
    """R = 0 with p_rest > 0 (topk_cases.no_rest_mass_case): KD = +inf; every output and the gradient as the
    cpu kernel gives them, NaN for NaN (the reference's gradient is undefined there)."""
    skip_unless_runs(backend)
    if backend == "cpu":
        pytest.skip("the cpu kernel is this test's oracle")
    if not smskd_fast.available_backends()["cpu"]:
        pytest.skip("the cpu kernel (this test's oracle) is not built")
    student, target, topk, options = no_rest_mass_case()
    results = {}
    for name in ("cpu", backend):
        device = "cpu" if name == "cpu" else device_of(backend)
        s = student.to(device).requires_grad_(True)
        rows = get_backend(name, s.device, topk=True).rows(RowInputs(
            s, target.to(device), None, None, topk.map_tensors(lambda t: t.to(device))), options)
        (grad,) = torch.autograd.grad(rows.loss.sum(), s)
        results[name] = [getattr(rows, f).detach().cpu() for f in FIELDS] + [grad.cpu()]
    assert torch.isinf(results["cpu"][FIELDS.index("kd")][0])  # the case is what it claims
    for name, got, want in zip(FIELDS + ("grad",), results[backend], results["cpu"]):
        torch.testing.assert_close(got, want, **cross_backend_tolerance(), equal_nan=True, msg=name)


@reruns_under_interpreter
@pytest.mark.parametrize("selection", ["test_dense_teacher_matches_reference", "test_topk_teacher_matches_reference",
                                       "not test_dense_teacher_matches_reference and not test_topk_teacher"])
def test_triton_cases_under_the_interpreter(selection):
    """Runs this file's triton cases under TRITON_INTERPRET=1 in a fresh interpreter, in three parts that each
    fit run_under_interpreter's time limit (see tests/triton_interpreter.py)."""
    run_under_interpreter(__file__, "-k", f"triton and ({selection})")
