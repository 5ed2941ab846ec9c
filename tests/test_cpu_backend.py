"""The C++ CPU kernel of smskd_fast::smskd_loss_rows against independent oracles.

Oracles: the float64 pure-PyTorch reference backend (values, and gradients by
autograd through it), torch.autograd.gradcheck (float64 finite differences),
torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch).

The value and gradient cases that every backend shares (shapes, dtypes, temperatures,
weightings, layouts, masked and NaN inputs, ignored rows, reductions) are in
tests/test_backend_conformance.py; this file keeps what is the CPU kernel's own:
threading (rows split over columns), instruction-set dispatch, bitwise-equal strided
reads, float64 gradcheck, opcheck, torch.compile, argument errors, backward's in-place
scaling. Tolerances: tests/tolerances.py (backend_tolerance("cpu", ...)).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import smskd_fast
from smskd_fast.backends.base import LossOptions, RowInputs
from smskd_fast.backends.reference import ReferenceBackend
from conformance_cases import INPUTS
from tolerances import backend_tolerance, large_logit_value_tolerance
from smskd_fast.backends.registry import resolve_backend
from smskd_fast.ops.schema import PER_ROW_OUTPUTS

OP = torch.ops.smskd_fast.smskd_loss_rows
FIELDS = PER_ROW_OUTPUTS

pytestmark = pytest.mark.skipif(
    not smskd_fast.available_backends()["cpu"].available,
    reason=f"the C++ CPU kernel is not built: {smskd_fast.available_backends()['cpu'].reason}",
)


def make_rows(n, c, dtype, *, seed=0, scale=3.0, config="smskd"):
    """Student, target, teacher, reference of shape (n, c); absent inputs are None."""
    has_target, has_teacher, has_reference, _ = INPUTS[config]
    g = torch.Generator().manual_seed(seed)

    def logits():
        return (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)

    student = logits()
    teacher = logits() if has_teacher else None
    reference = logits() if has_reference else None
    target = torch.randint(0, c, (n,), generator=g) if has_target else None
    return student, target, teacher, reference


def op_rows(student, target, teacher, reference, options: LossOptions, compute_grad=True):
    return OP(student, target, teacher, reference, options.temperature, options.ce_weight, options.kd_weight,
              options.ref_weight, options.weighting, options.ignore_index, compute_grad)


def reference_rows(student, target, teacher, reference, options: LossOptions):
    """Per-row values and d(sum_i loss_i)/d student from the float64 reference backend."""
    def f64(x):
        return None if x is None else x.detach().to(torch.float64)

    s = f64(student).requires_grad_(True)
    rows = ReferenceBackend().rows(RowInputs(s, target, f64(teacher), f64(reference)), options)
    (grad,) = torch.autograd.grad(rows.loss.sum(), s)
    return [getattr(rows, f).detach() for f in FIELDS], grad


def cpu_tolerance(dtype, row_weights=False):
    """(values, gradient) tolerances of the CPU kernel against float64 (tests/tolerances.py)."""
    return backend_tolerance("cpu", dtype, temperature=4.0, num_classes=0, topk=False, row_weights=row_weights,
                             max_abs_logit=0.0, weight_sum=0.0, grad_scale=0.0)


def assert_matches_reference(student, target, teacher, reference, options):
    dtype = student.dtype
    *per_row, grad = op_rows(student, target, teacher, reference, options)
    expected, expected_grad = reference_rows(student, target, teacher, reference, options)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    value_tol, grad_tol = cpu_tolerance(dtype)
    for name, got, want in zip(FIELDS, per_row, expected):
        assert got.dtype == acc, name
        torch.testing.assert_close(got.double(), want, **value_tol, msg=lambda m: f"{name}: {m}")
    assert grad.dtype == dtype and grad.shape == student.shape
    torch.testing.assert_close(grad.double(), expected_grad, **grad_tol, msg=lambda m: f"grad: {m}")


def options_for(config, temperature=4.0, **overrides):
    weighting = INPUTS[config][3]
    return LossOptions(temperature=temperature, weighting=weighting, **overrides)


def test_cpu_backend_is_available_and_auto_picks_it():
    assert smskd_fast.available_backends()["cpu"].available
    assert resolve_backend("auto", torch.device("cpu"), torch.float32, 10).name == "cpu"


# Fewer rows than threads and C >= 2 * threads * 1024: each row's columns are split among
# the threads and the partial online-softmax statistics merged.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_rows_split_over_columns(two_threads, dtype):
    c = 9000
    student, target, teacher, reference = make_rows(1, c, dtype)
    student[0, 8000] = 40.0  # the row's maxima lie in the last part: the merge rescales the first
    teacher[0, 7000] = 40.0
    assert_matches_reference(student, target, teacher, reference, options_for("smskd"))
    for x in (student, teacher, reference):
        x[0, : c // 2] = float("-inf")  # the first part has probability 0 everywhere
    target[0] = c - 1
    assert_matches_reference(student, target, teacher, reference, options_for("smskd"))
    student, target, teacher, _ = make_rows(1, c, dtype, config="ce_kd")
    assert_matches_reference(student, target, teacher, None, options_for("ce_kd"))
    student, _, teacher, _ = make_rows(1, c, dtype, config="kd_only")
    assert_matches_reference(student, None, teacher, None, options_for("kd_only"))


def test_rows_split_over_columns_nan_and_ignored(two_threads):
    student, target, teacher, reference = make_rows(1, 9000, torch.float32)
    teacher[0, 8500] = float("nan")
    loss, *_, grad = op_rows(student, target, teacher, reference, options_for("smskd"))
    assert torch.isnan(loss).all() and torch.isnan(grad).all()
    target[0] = -100
    outputs = op_rows(student, target, teacher, reference, options_for("smskd"))
    assert all((values == 0).all() for values in outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_strided_inputs_give_the_contiguous_results_bitwise(dtype):
    """The kernel reads strided rows and columns in place: the same values as from contiguous copies."""
    n, c = 6, 1100
    student, target, teacher, reference = make_rows(n, c, dtype)
    wide = torch.zeros(n, 2 * c, dtype=dtype)
    wide[:, ::2] = teacher
    tall = torch.zeros(2 * n, c, dtype=dtype)
    tall[::2] = reference
    views = (student.t().contiguous().t(), wide[:, ::2], tall[::2])  # transposed, column-strided, row-strided
    assert views[0].stride() == (1, n) and views[1].stride(1) == 2 and views[2].stride(0) == 2 * c
    target_view = torch.stack([target, target], 1)[:, 0]
    assert not target_view.is_contiguous()
    options = options_for("smskd")
    strided = op_rows(views[0], target_view, views[1], views[2], options)
    contiguous = op_rows(student, target, teacher, reference, options)
    for got, want in zip(strided, contiguous):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).replace("torch.", ""))
def test_logits_of_magnitude_1e4(dtype):
    student, target, teacher, reference = make_rows(4, 500, dtype, scale=1e4)
    near = (student.double() + torch.randn(4, 500, dtype=torch.float64)).to(dtype)  # KL small, logits huge
    options = options_for("smskd")
    *per_row, grad = op_rows(student, target, teacher, reference, options)
    expected, expected_grad = reference_rows(student, target, teacher, reference, options)
    assert all(torch.isfinite(v).all() for v in per_row) and torch.isfinite(grad).all()
    for got, want in zip(per_row, expected):
        torch.testing.assert_close(got.double(), want, **large_logit_value_tolerance(dtype))
    torch.testing.assert_close(grad.double(), expected_grad, **cpu_tolerance(dtype)[1])
    assert_matches_reference(student, target, near, reference, options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(reduction):
    student, target, teacher, reference = make_rows(4, 7, torch.float64)
    target[3] = -100
    s = student.clone().requires_grad_(True)

    def smskd(x):
        return smskd_fast.smskd_loss(x, target, teacher, reference, temperature=2.0, reduction=reduction,
                                     backend="cpu").loss

    def kd(x):
        return smskd_fast.kd_loss(x, teacher, temperature=3.0, reduction=reduction, backend="cpu")

    assert torch.autograd.gradcheck(smskd, (s,))
    assert torch.autograd.gradcheck(kd, (s,))


def _opcheck_cases():
    cases = []
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for (n, c), config, compute_grad in (((3, 5), "smskd", True), ((1, 1), "kd_only", True),
                                             ((4, 33), "ce_kd", False), ((0, 8), "smskd", True)):
            cases.append(pytest.param(dtype, n, c, config, compute_grad,
                                      id=f"{str(dtype)[6:]}-{n}x{c}-{config}-grad{int(compute_grad)}"))
    return cases


@pytest.mark.parametrize("dtype,n,c,config,compute_grad", _opcheck_cases())
def test_opcheck(dtype, n, c, config, compute_grad):
    student, target, teacher, reference = make_rows(n, c, dtype, config=config)
    student.requires_grad_(compute_grad)
    o = options_for(config)
    args = (student, target, teacher, reference, o.temperature, o.ce_weight, o.kd_weight, o.ref_weight,
            o.weighting, o.ignore_index, compute_grad)
    torch.library.opcheck(OP.default, args)


def test_torch_compile_fullgraph_as_the_first_call(monkeypatch):
    """A process whose first call of the loss is traced: resolving backend="auto" asks each backend
    whether it can run, and with a top-k teacher whether it has that kernel (queries dynamo cannot
    trace); neither may break the graph."""
    from smskd_fast.backends import registry
    from smskd_fast.backends.topk import TopKTeacher

    monkeypatch.setattr(registry, "_STATUS", {})
    monkeypatch.setattr(registry, "_AUTO_CANDIDATES", {})
    torch._dynamo.reset()
    student, target, teacher, reference = make_rows(8, 50, torch.float32)
    topk = TopKTeacher.from_logits(teacher, target, 6, 2.0)

    def losses(s):
        dense = smskd_fast.smskd_loss(s, target, teacher, reference, temperature=2.0, reduction="sum")
        sparse = smskd_fast.smskd_loss(s, target, None, reference, teacher_topk=topk, temperature=2.0)
        return dense.loss + dense.ce + sparse.loss + smskd_fast.kd_loss(s, teacher)

    s = student.clone().requires_grad_(True)
    torch.compile(losses, fullgraph=True, backend="eager")(s).backward()
    assert registry._STATUS["cpu"].available
    s_eager = student.clone().requires_grad_(True)
    losses(s_eager).backward()
    torch.testing.assert_close(s.grad, s_eager.grad, rtol=0, atol=0)


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "default",
                    reason="inductor emits at::vec code that does not compile with ATEN_CPU_CAPABILITY=default")
def test_torch_compile_fullgraph_round_trip():
    student, target, teacher, reference = make_rows(16, 300, torch.float32)

    def loss_fn(s, y, t, r):
        out = smskd_fast.smskd_loss(s, y, t, r, backend="cpu")
        return out.loss + 0.0 * out.kd + smskd_fast.kd_loss(s, t, backend="cpu")

    compiled = torch.compile(loss_fn, fullgraph=True)
    s_eager = student.clone().requires_grad_(True)
    s_compiled = student.clone().requires_grad_(True)
    eager_loss = loss_fn(s_eager, target, teacher, reference)
    # Compiled afresh: inductor's on-disk caches do not key on ATEN_CPU_CAPABILITY, so an
    # entry written under another capability could hand back code for another vector width.
    # (backward is compiled at its first call, so it runs inside the patch too).
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled_loss = compiled(s_compiled, target, teacher, reference)
        compiled_loss.backward()
    eager_loss.backward()
    # The op itself runs the same kernel in both; the sums and scalings around it are
    # inductor's code in one and ATen's in the other, which may round differently.
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(s_compiled.grad, s_eager.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bad", [7, -1, 1 << 40])
def test_target_out_of_range_is_a_clear_error(bad):
    student, target, teacher, reference = make_rows(4, 7, torch.float32)
    target[2] = bad
    with pytest.raises(ValueError, match=rf"target values must be in \[0, 7\) or equal ignore_index=-100, "
                                         rf"found {bad} at target\[2\]"):
        op_rows(student, target, teacher, reference, options_for("smskd"))
    # -1 is fine once it is the ignore_index.
    if bad == -1:
        op_rows(student, target, teacher, reference, options_for("smskd", ignore_index=-1))


def test_bad_arguments_are_clear_errors():
    student, target, teacher, reference = make_rows(4, 7, torch.float32)
    o = options_for("smskd")
    with pytest.raises(TypeError, match="teacher must have the student's dtype"):
        op_rows(student, target, teacher.double(), reference, o)
    with pytest.raises(ValueError, match="reference must have the student's shape"):
        op_rows(student, target, teacher, reference[:, :3], o)
    with pytest.raises(ValueError, match="weighting must be"):
        op_rows(student, target, teacher, reference, LossOptions(weighting="softmax"))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        op_rows(student, target, teacher, reference, LossOptions(temperature=0.0))
    with pytest.raises(ValueError, match="student must have shape"):
        op_rows(student[0], target, None, None, o)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        op_rows(student, target.float(), teacher, reference, o)
    with pytest.raises(TypeError, match="student must be float64, float32"):
        op_rows(student.int(), target, None, None, o)


# Every instruction-set copy of the kernel that this CPU can run (ATEN_CPU_CAPABILITY
# lowers the choice, as for PyTorch's own kernels) gives the same values.
_CAPABILITY_SCRIPT = textwrap.dedent("""
    import sys, torch, smskd_fast
    sys.path.insert(0, sys.argv[1])
    from test_cpu_backend import make_rows, options_for, assert_matches_reference
    print(torch.backends.cpu.get_cpu_capability())
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for c, config in ((3, "smskd"), (1500, "smskd"), (50, "kd_only"), (40, "ce_only")):
            rows = make_rows(5, c, dtype, config=config)
            rows[0][0, 4 % c] = float("-inf")
            if rows[2] is not None:
                rows[2][0, 4 % c] = float("-inf")
            assert_matches_reference(*rows, options_for(config))
""")


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_each_instruction_set_matches_reference(capability):
    if capability != "default" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU runs ATen's {torch.backends.cpu.get_cpu_capability()} kernels, not AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT, os.path.dirname(__file__)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split()[0] == capability.upper()


def test_backward_twice_with_retained_graph():
    """backward scales the kernel's gradient in place only when the graph is freed."""
    student, target, teacher, reference = make_rows(5, 60, torch.float64)
    s = student.clone().requires_grad_(True)
    loss = smskd_fast.smskd_loss(s, target, teacher, reference, backend="cpu").loss * 3.0
    (first,) = torch.autograd.grad(loss, s, retain_graph=True)
    (second,) = torch.autograd.grad(loss, s)
    _, expected = reference_rows(student, target, teacher, reference, options_for("smskd"))
    torch.testing.assert_close(first, expected * 3.0 / 5, **cpu_tolerance(torch.float64)[1])
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_retained_graph", [False, True])
def test_per_row_weights_scale_the_gradient_with_one_more_rounding(dtype, with_retained_graph):
    """d(sum_i v_i loss_i)/d student: backward forms fl(g_i) v_i in fp32 and rounds it once, so the
    result is within two roundings of the float64 value (a bf16 v_i, as before, made it three)."""
    student, target, teacher, reference = make_rows(64, 1000, dtype)
    target[1::5] = -100
    options = options_for("smskd", temperature=2.5)
    v = torch.linspace(0.5, 1.5, 64)
    s = student.clone().requires_grad_(True)
    out = smskd_fast.smskd_loss(s, target, teacher, reference, temperature=2.5, reduction="none", backend="cpu")
    (got,) = torch.autograd.grad((out.loss * v).sum(), s, retain_graph=with_retained_graph)
    s64 = student.double().requires_grad_(True)
    rows = ReferenceBackend().rows(RowInputs(s64, target, teacher.double(), reference.double()), options)
    (want,) = torch.autograd.grad((rows.loss * v.double()).sum(), s64)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **cpu_tolerance(dtype, row_weights=True)[1])
