"""The cuda backend's own tests (csrc/cuda + kernels/), on a GPU: errors, device asserts, the in-place
gradient, streams, opcheck, torch.compile, the auto choice.

The value and gradient cases every backend shares (the vocabulary ladder over the
kernels' row layouts, strided and misaligned rows, temperatures, leading dimensions,
-inf masks, C = 1, ignored rows, the empty batch, int32 targets) are in
tests/test_backend_conformance.py, where the cuda parametrization runs them.
Skipped without a CUDA device or without a CUDA build of smskd_fast._C.
"""
import math

import pytest
import torch

import smskd_fast
from smskd_fast.ops import registration as ops
from smskd_fast.backends import registry
from smskd_fast.backends.topk import TopKTeacher
from gpu_child import assert_fails_loudly, run_child

CUDA_STATUS = smskd_fast.available_backends()["cuda"]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA_STATUS, reason=f"cuda backend unavailable: {CUDA_STATUS.reason}"),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_inputs(n, c, dtype, with_target, with_teacher, with_ref, *, seed=0):
    """Logits in dtype and a target with ignored rows."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def logits():
        return (3 * torch.randn(n, c, generator=g, device="cuda")).to(dtype)

    student = logits()
    teacher = logits() if with_teacher else None
    reference = logits() if with_ref else None
    target = None
    if with_target:
        target = torch.randint(0, c, (n,), generator=g, device="cuda")
        target[1::5] = -100
    return student, target, teacher, reference


def run_loss(backend, student, target, teacher, reference, weighting, temperature=2.5, **kw):
    """Per-row outputs and the gradient of sum_i v_i * loss_i for a fixed random v."""
    student = student.detach().requires_grad_(True)
    options = dict(temperature=temperature, reduction="none", backend=backend, **kw)
    if target is None:
        loss = smskd_fast.kd_loss(student, teacher, **options)
        rows = dict(loss=loss)
    else:
        out = smskd_fast.smskd_loss(student, target, teacher, reference, ce_weight=0.7, kd_weight=1.3,
                                    ref_weight=0.9, weighting=weighting, **options)
        rows = dict(loss=out.loss, ce=out.ce, kd=out.kd, ref=out.ref, tcp=out.tcp, weight=out.weight)
        loss = out.loss
    v = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device, dtype=loss.dtype).reshape(loss.shape)
    (loss * v).sum().backward()
    return rows, student.grad


def test_float64_on_cuda_names_the_reference_backend():
    student = torch.randn(2, 5, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='reference'"):
        smskd_fast.smskd_loss(student, torch.zeros(2, dtype=torch.long, device="cuda"), backend="cuda")


def test_target_out_of_range_trips_the_device_assertion():
    """A bad target must fail loudly; the assertion poisons the CUDA context, so run it in a child process."""
    result = run_child("""
        import torch, smskd_fast
        s = torch.randn(4, 10, device="cuda")
        t = torch.tensor([1, 2, 10, 3], device="cuda")
        smskd_fast.smskd_loss(s, t, backend="cuda").loss.item()
    """)
    assert_fails_loudly(result, "target out of range", "device-side assert")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_overwrite_student_logits_gives_the_same_loss_and_gradient(dtype):
    student, target, teacher, reference = make_inputs(40, 5003, dtype, True, True, True)
    want_rows, want_grad = run_loss("cuda", student, target, teacher, reference, "inverse_tcp")

    leaf = student.detach().clone().requires_grad_(True)
    logits = leaf * 1  # a non-leaf, as the output of an lm head would be
    out = smskd_fast.smskd_loss(logits, target, teacher, reference, ce_weight=0.7, kd_weight=1.3, ref_weight=0.9,
                                temperature=2.5, reduction="none", backend="cuda", overwrite_student_logits=True)
    v = torch.linspace(0.5, 1.5, 40, device="cuda")
    (out.loss * v).sum().backward()
    torch.testing.assert_close(out.loss, want_rows["loss"], rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad, want_grad, rtol=0, atol=0)
    # The logits' storage now holds the gradient: no separate N x C buffer was made.
    torch.testing.assert_close(logits.detach(), want_grad, rtol=0, atol=0)


def test_overwrite_refuses_a_second_backward():
    student, target, teacher, reference = make_inputs(4, 100, torch.float32, True, True, True)
    logits = student.clone().requires_grad_(True) * 1
    loss = smskd_fast.smskd_loss(logits, target, teacher, reference, backend="cuda",
                                 overwrite_student_logits=True).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_opcheck():
    student, target, teacher, reference = make_inputs(6, 300, torch.float32, True, True, True)
    args = (student.requires_grad_(True), target, teacher, reference, 2.0, 1.0, 1.0, 1.0, "inverse_tcp", -100, True)
    torch.library.opcheck(torch.ops.smskd_fast.smskd_loss_rows, args)


def test_torch_compile_matches_eager():
    student, target, teacher, reference = make_inputs(32, 1000, torch.bfloat16, True, True, True)

    def loss_fn(s):
        return smskd_fast.smskd_loss(s, target, teacher, reference, backend="cuda").loss

    eager_s = student.clone().requires_grad_(True)
    loss_fn(eager_s).backward()
    compiled_s = student.clone().requires_grad_(True)
    torch.compile(loss_fn, fullgraph=True)(compiled_s).backward()
    torch.testing.assert_close(compiled_s.grad, eager_s.grad)


def test_runs_on_the_current_stream_of_a_side_stream():
    student, target, teacher, reference = make_inputs(64, 4096, torch.float32, True, True, True)
    want = smskd_fast.smskd_loss(student, target, teacher, reference, backend="cuda").loss
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = smskd_fast.smskd_loss(student, target, teacher, reference, backend="cuda").loss
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_auto_picks_a_gpu_backend_for_cuda_tensors():
    chosen = registry.resolve_backend("auto", torch.device("cuda"), torch.bfloat16, 32000)
    assert chosen.name in ("cuda", "triton")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(ops.INPLACE_OP_NAME, "CUDA")


# ---- grad_scale (the ops' argument before reduction, issue 17): a 0-d float32 on the device that the kernel reads.
SCALARS = (2.5, 0.7, 1.3, 0.9, "inverse_tcp", -100)


def run_ops(student, target, teacher, reference, grad_scale):
    """{op: (six per-row outputs, gradient)} of the three CUDA ops with grad_scale (None: without)."""
    topk = TopKTeacher.from_logits(teacher, target, 40, SCALARS[0])
    dense = torch.ops.smskd_fast.smskd_loss_rows(student, target, teacher, reference, *SCALARS, True, grad_scale)
    sparse = torch.ops.smskd_fast.smskd_loss_rows_topk(
        student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
        topk.log_sum_exp_at_temperature, reference, *SCALARS, True, grad_scale)
    overwritten = student.clone()
    in_place = torch.ops.smskd_fast.smskd_loss_rows_inplace_(overwritten, target, teacher, reference, *SCALARS,
                                                             grad_scale)
    return {"dense": (dense[:6], dense[6]), "topk": (sparse[:6], sparse[6]), "inplace": (in_place, overwritten)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [0.25, -2.0, 1 / 3, 3.5])
def test_grad_scale_scales_the_gradient_and_nothing_else(dtype, scale):
    """The gradient is grad_scale times the one without it: bit for bit for a power of two (where both are
    in the dtype's normal range), else within the two roundings to the dtype (rtol) and fp32's rounding of the scaled
    terms, whose size is at most the coefficients' sum ce_w + T (kd_w + ref_w) (atol, with the spacing of
    the dtype's subnormals); the per-row outputs are unchanged, bit for bit."""
    student, target, teacher, reference = make_inputs(37, 2049, dtype, True, True, True)
    without = run_ops(student, target, teacher, reference, None)
    scale32 = float(torch.tensor(scale, dtype=torch.float32))
    scaled = run_ops(student, target, teacher, reference, torch.tensor(scale, device="cuda"))
    finfo = torch.finfo(dtype)
    for op, (rows, grad) in scaled.items():
        base_rows, base_grad = without[op]
        assert all(torch.equal(a, b) for a, b in zip(rows, base_rows)), op
        want = base_grad.double() * scale32
        if math.frexp(abs(scale))[0] == 0.5:
            # zeros too when |scale| <= 1 (an underflowed zero scaled up may round to a subnormal)
            normal = (torch.minimum(want.abs(), base_grad.double().abs()) > finfo.tiny) | (
                (base_grad == 0) & (abs(scale) <= 1))
            assert torch.equal(grad.double()[normal], want[normal]), op
        else:
            fp32 = torch.finfo(torch.float32).eps
            terms = (SCALARS[1] + SCALARS[0] * (SCALARS[2] + SCALARS[3])) * abs(scale32)
            torch.testing.assert_close(grad.double(), want, rtol=finfo.eps + 4 * fp32,
                                       atol=8 * fp32 * terms + finfo.tiny * finfo.eps, msg=lambda m: f"{op}: {m}")


@pytest.mark.parametrize("bad, error, match", [
    (lambda: torch.full((2,), 0.5, device="cuda"), ValueError, r"grad_scale must be a 0-d tensor .*got shape \[2\]"),
    (lambda: torch.tensor(0.5, device="cuda", dtype=torch.float64), TypeError, "grad_scale must be Float .*got Double"),
    (lambda: torch.tensor(0.5), ValueError, "grad_scale must be on the student's device"),
], ids=["shape", "dtype", "device"])
@pytest.mark.parametrize("compute_grad", [True, False])
def test_a_bad_grad_scale_is_refused(bad, error, match, compute_grad):
    """Checked as the CPU ops check it (csrc/grad_scale_arg.h), with or without a gradient to scale."""
    student, target, teacher, reference = make_inputs(4, 100, torch.float32, True, True, True)
    with pytest.raises(error, match=match):
        torch.ops.smskd_fast.smskd_loss_rows(student, target, teacher, reference, *SCALARS, compute_grad, bad())
    topk = TopKTeacher.from_logits(teacher, target, 5, SCALARS[0])
    with pytest.raises(error, match=match):
        torch.ops.smskd_fast.smskd_loss_rows_topk(student, target, topk.values, topk.indices, topk.true_logit,
                                                  topk.log_sum_exp, topk.log_sum_exp_at_temperature, reference,
                                                  *SCALARS, compute_grad, bad())
    if compute_grad:
        with pytest.raises(error, match=match):
            torch.ops.smskd_fast.smskd_loss_rows_inplace_(student.clone(), target, teacher, reference, *SCALARS,
                                                          bad())


# Backward scales the op's saved grad output in place, so opcheck's AOT comparison after an eager
# backward (grad_output 1) holds only for grad_scale 1; other scales run the remaining checks
# (as tests/test_grad_scale.py does for the CPU op).
@pytest.mark.parametrize("scale, test_utils", [
    (1.0, ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")),
    (0.25, ("test_schema", "test_autograd_registration", "test_faketensor")),
], ids=["scale1", "scale0.25"])
def test_opcheck_with_grad_scale(scale, test_utils):
    student, target, teacher, reference = make_inputs(6, 300, torch.float32, True, True, True)
    args = (student.requires_grad_(True), target, teacher, reference, *SCALARS, True,
            torch.tensor(scale, device="cuda"))
    torch.library.opcheck(torch.ops.smskd_fast.smskd_loss_rows.default, args, test_utils=test_utils)
