"""NaN and +-inf logits: every backend gives the float64 reference's NaN/inf pattern in every output.

One non-finite value in the student, teacher or reference logits, off the target or at it, under each
weighting of the reference term: loss, CE, KD, reference term, TCP and w_i have the reference's NaN and inf
entries and its finite values; the gradient agrees wherever the reference's is finite and has a non-finite
entry in every row where the reference's has one. No crash, and no finite number where the reference has
none (a +inf teacher logit gave the cpu kernel TCP 0 and so a finite reference term; a +inf student logit
gave CE NaN for +inf in Triton and, on fp64 or ATen's DEFAULT instruction set, the cpu kernel). The cpu cases
run here, and again under ATEN_CPU_CAPABILITY=default; the triton ones on CPU tensors under
TRITON_INTERPRET=1 (tests/triton_interpreter.py) or on a GPU, beside the cuda ones.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import smskd_fast
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.ops.extension import extension_loaded
from tolerances import grad_tolerance
from triton_interpreter import DEVICE, needs_kernels, reruns_under_interpreter, run_under_interpreter

BACKEND_DEVICES = {"cpu": "cpu", "triton": DEVICE, "cuda": "cuda"}
BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not extension_loaded(), reason="needs the compiled smskd_fast._C")),
    pytest.param("triton", marks=needs_kernels),
    pytest.param("cuda", marks=pytest.mark.skipif(not smskd_fast.available_backends()["cuda"],
                                                  reason="needs a CUDA device and the CUDA kernels")),
]
VALUES = [float("nan"), float("inf"), float("-inf")]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
WEIGHTINGS = ["constant", "inverse_tcp", "tcp"]
OUTPUTS = ("loss", "ce", "kd", "ref", "tcp", "weight")


def run(backend, s, y, t, r, options):
    """The backend's outputs and the student's gradient of the summed loss, on the backend's device."""
    device = BACKEND_DEVICES.get(backend, "cpu")
    s = s.detach().to(device).requires_grad_(True)
    t, r = (None if x is None else x.to(device) for x in (t, r))
    if "teacher_topk" in options:
        topk = options["teacher_topk"]
        options = dict(options, teacher_topk=topk.map_tensors(lambda field: field.to(device)))
    out = smskd_fast.smskd_loss(s, y.to(device), t, r, backend=backend, **options)
    out.loss.sum().backward()
    return out, s.grad.cpu()


def assert_non_finite_like_the_reference(out, grad, want, want_grad, grad_atol):
    """The same NaN/inf pattern as the reference in every output, finite values equal within fp32 rounding,
    the gradient within grad_atol (its storage's rounding: tests/tolerances.py)."""
    for key in OUTPUTS:
        got_v, want_v = getattr(out, key).detach().cpu().double(), getattr(want, key).detach()
        assert torch.equal(torch.isnan(got_v), torch.isnan(want_v)), (key, got_v, want_v)
        assert torch.equal(torch.isinf(got_v), torch.isinf(want_v)), (key, got_v, want_v)
        assert torch.equal(got_v[torch.isinf(got_v)], want_v[torch.isinf(want_v)]), (key, got_v, want_v)  # signs
        finite = torch.isfinite(want_v)
        torch.testing.assert_close(got_v[finite], want_v[finite], rtol=1e-5, atol=1e-5)
    # Gradients: every entry where the reference's is finite agrees (an infinite loss can
    # have a finite gradient, e.g. a -inf student logit where the teacher has mass); a row
    # where the reference's has a NaN or inf has one too, so that an inf/NaN check on the
    # gradients sees it. Which entries of such a row are non-finite depends on the
    # formula (autograd through log_softmax or the closed form) and is not compared.
    finite = torch.isfinite(want_grad)
    torch.testing.assert_close(grad.double()[finite], want_grad[finite], rtol=0, atol=grad_atol)
    for row in torch.nonzero(~finite.all(dim=-1)).flatten():
        assert not torch.isfinite(grad[row]).all(), f"row {row}: the reference's gradient is not finite, ours is"


def in_teacher_form(teacher_form, t, y, kept, options):
    """(teacher, options) for the dense teacher t, or for its top-k form: t's `kept` largest classes as a cache
    in options, and no dense teacher."""
    if teacher_form == "dense":
        return t, options
    return None, dict(options, teacher_topk=TopKTeacher.from_logits(t, y, kept, options["temperature"]))


def against_the_reference(backend, s, y, t, r, options, oracle_frozen=None):
    """The backend's outputs and gradient against the float64 reference's, on the same logits or with the
    teacher and reference oracle_frozen (t, r) given for the reference."""
    out, grad = run(backend, s, y, t, r, options)
    upcast = [None if x is None else x.double() for x in (oracle_frozen or (t, r))]
    want, want_grad = run("reference", s.double(), y, *upcast, options)
    grad_atol = 1e-5
    if s.dtype in (torch.bfloat16, torch.float16):  # a gradient stored in 8 or 11 bits, entries up to 1 + 2 T
        T = options.get("temperature", 4.0)
        grad_atol = grad_tolerance(s.dtype, float(s[torch.isfinite(s)].abs().max()), T, 1.0 + 2.0 * T)[1]
    assert_non_finite_like_the_reference(out, grad, want, want_grad, grad_atol)


@pytest.mark.parametrize("backend, dtype", [
    pytest.param(*p.values, dtype, marks=p.marks, id=f"{p.values[0]}-{str(dtype)[6:]}")
    for p in BACKENDS for dtype in DTYPES if not (p.values[0] == "triton" and dtype == torch.float64)])
@pytest.mark.parametrize("where", ["student", "teacher", "reference"])
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("column", [5, 2], ids=["off the target", "at the target"])
def test_non_finite_inputs_give_what_the_reference_gives(backend, dtype, where, value, weighting, temperature,
                                                         column):
    """Rows of 9 classes (Triton's tile kernel); row 1's target is column 2. Every input dtype (Triton refuses
    float64), and T = 1 and 2, whose kernels take the T = 1 exponentials from those at T."""
    g = torch.Generator().manual_seed(0)
    s, t, r = (torch.randn(4, 9, generator=g).to(dtype) for _ in range(3))
    y = torch.tensor([1, 2, 3, 4])
    {"student": s, "teacher": t, "reference": r}[where][1, column] = value
    against_the_reference(backend, s, y, t, r, dict(reduction="none", weighting=weighting, temperature=temperature))


@pytest.mark.parametrize("backend", BACKENDS)
# (A top-k teacher's own non-finite values are test_topk.py's cases.)
@pytest.mark.parametrize("teacher_form, where", [("dense", "student"), ("dense", "teacher"), ("dense", "reference"),
                                                 ("topk", "student"), ("topk", "reference")])
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("weighting", ["constant", "inverse_tcp"])
@pytest.mark.parametrize("column", [5, 3000, 8500], ids=["first part", "the target", "last part"])
def test_non_finite_inputs_in_a_row_split_over_columns(two_threads, backend, teacher_form, where, value, weighting,
                                                       column):
    """One row of 9000 classes: the cpu kernel splits its columns among threads and merges their statistics,
    Triton takes it in column blocks; a non-finite logit in either part, or at the target, gives what the
    reference gives (a +inf maximum gave NaN, not inf, in the cpu kernel's merge)."""
    g = torch.Generator().manual_seed(1)
    s, t, r = (torch.randn(1, 9000, generator=g) for _ in range(3))
    y = torch.tensor([3000])
    {"student": s, "teacher": t, "reference": r}[where][0, column] = value
    t, options = in_teacher_form(teacher_form, t, y, 20, dict(reduction="none", weighting=weighting, temperature=2.0))
    against_the_reference(backend, s, y, t, r, options)


PAIRS = [(float("nan"), float("inf")), (float("inf"), float("nan")), (float("nan"), float("-inf")),
         (float("inf"), float("-inf")), (float("-inf"), float("inf")), (float("inf"), float("inf"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_form, where", [("dense", "student"), ("dense", "teacher"), ("dense", "reference"),
                                                 ("topk", "student"), ("topk", "reference")])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda pair: f"{pair[0]}-{pair[1]}")
@pytest.mark.parametrize("num_classes, columns", [(9, (5, 7)), (9, (7, 3)), (9000, (5, 8500)), (9000, (8500, 3000))],
                         ids=["tile", "tile at the target", "column blocks", "column blocks at the target"])
def test_two_non_finite_values_in_one_row(backend, teacher_form, where, pair, num_classes, columns):
    """A NaN beside a +inf in one row gives NaN, as the reference does, in either order and whichever part of a
    split row holds each: a GPU maximum that skips NaN (PTX max.f32, fmaxf) took the +inf, and the CE guard for a
    +inf maximum then gave CE +inf. Also +inf beside -inf and two +inf. Dense and top-k teacher (4 of 9 or 20
    of 9000 classes kept)."""
    g = torch.Generator().manual_seed(2)
    s, t, r = (torch.randn(2, num_classes, generator=g) for _ in range(3))
    y = torch.tensor([3000 % num_classes, 3000 % num_classes])
    logits = {"student": s, "teacher": t, "reference": r}[where]
    for column, value in zip(columns, pair):
        logits[1, column] = value
    t, options = in_teacher_form(teacher_form, t, y, 4 if num_classes == 9 else 20,
                                 dict(reduction="none", weighting="inverse_tcp", temperature=2.0))
    against_the_reference(backend, s, y, t, r, options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_form, where", [("dense", "teacher"), ("dense", "reference"), ("topk", "reference")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("gap", [150.0, 400.0])
@pytest.mark.parametrize("num_classes, masked", [(9, 3), (9000, 16)], ids=["tile", "column blocks"])
def test_a_student_minus_inf_where_the_frozen_probability_underflows_float32(two_threads, backend, teacher_form,
                                                                             where, dtype, gap, num_classes, masked):
    """The student -inf at its first classes, where the teacher (or reference) is finite but `gap` T below that
    row's maximum, which comes later and in one step: the tile kernel takes it whole, the column-block and cpu
    kernels meet it when they merge their lanes (or threads), so the factor that rescales those classes' sums is
    past float32's range (0) at once, and they add nothing. KD (the reference term) is finite, as the reference
    backend computes it in float32 (p == 0); the float64 reference gives +inf there up to ~745 T (checked: the
    case is what it claims; a maximum reached in smaller steps can keep +inf, README). Oracle: the float64
    reference with those frozen logits at -inf. Triton's column-block kernel gave NaN (a +inf cross sum times a
    rescale of 0) until stop 36; the cpu and CUDA kernels drop a sum rescaled by 0."""
    T = 2.0
    g = torch.Generator().manual_seed(3)
    s, t, r = (torch.randn(2, num_classes, generator=g) for _ in range(3))
    y = torch.tensor([num_classes - 2, num_classes - 2])
    frozen = {"teacher": t, "reference": r}[where]
    s[1, :masked] = float("-inf")
    frozen[1, :masked] = 0.0
    frozen[1, num_classes - 3] = gap * T
    s, t, r = (x.to(dtype) for x in (s, t, r))
    oracle = {"teacher": t.clone(), "reference": r.clone()}
    oracle[where][1, :masked] = float("-inf")
    options = dict(reduction="none", weighting="constant", temperature=T)
    as_is = run("reference", s.double(), y, t.double(), r.double(), options)[0]
    assert torch.isinf(getattr(as_is, "kd" if where == "teacher" else "ref")[1])  # in float64: +inf
    t, options = in_teacher_form(teacher_form, t, y, 4 if num_classes == 9 else 20, options)
    oracle_teacher = None if teacher_form == "topk" else oracle["teacher"]  # a top-k teacher: the cache in options
    against_the_reference(backend, s, y, t, r, options, oracle_frozen=(oracle_teacher, oracle["reference"]))


@pytest.mark.skipif(not extension_loaded(), reason="needs the compiled smskd_fast._C")
def test_cpu_cases_on_the_default_instruction_set():
    """The cpu cases again with ATen's DEFAULT copy of the kernel (std::exp: NaN for a NaN argument, where
    AVX2/AVX512's exp_u20 clamps it to a finite number), as ATEN_CPU_CAPABILITY=default selects it."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k",
                             "cpu and not instruction_set", "-W", "ignore::RuntimeWarning"],
                            capture_output=True, text=True, cwd=os.path.dirname(__file__), env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file's Triton cases under TRITON_INTERPRET=1 in a fresh interpreter (tests/triton_interpreter.py)."""
    run_under_interpreter(__file__, "-k", "triton")
