"""The cuda backend (csrc/cuda + kernels/) against the float64 reference backend, on a GPU.

Every case runs the same logits (rounded to the tested dtype) through backend="cuda"
and, cast to float64, through backend="reference"; per-row terms and the
gradient (from autograd through the reference's torch operations) must agree.
Skipped without a CUDA device or without a CUDA build of smskd_fast._C.
"""
import pytest
import torch

import smskd_fast
from smskd_fast.ops import registration as ops
from smskd_fast.backends import registry
from gpu_child import assert_fails_loudly, run_child
from tolerances import scaled_grad_rtol

CUDA_STATUS = smskd_fast.available_backends()["cuda"]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA_STATUS, reason=f"cuda backend unavailable: {CUDA_STATUS.reason}"),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Straddles the kernel layouts (8 lanes <= 128 < 16 lanes <= 512 < warp <= 2048 < 256-thread
# block <= 16384 < 512-thread block), odd sizes for unaligned heads and tails, LLM vocabularies.
CLASSES = (1, 7, 100, 129, 513, 1000, 2048, 2049, 5003, 16384, 16385, 32000, 50257, 131072)
# (target, teacher, reference, weighting): every input combination the public API allows.
INPUTS = (
    (True, True, True, "inverse_tcp"),
    (True, True, True, "tcp"),
    (True, True, False, "inverse_tcp"),
    (True, False, True, "constant"),
    (True, False, False, "constant"),
    (False, True, False, "constant"),
)
# Tolerances: per-row values are fp32 sums over C. The gradient of sum_i v_i loss_i is the
# kernel's row gradient (fp32 error <= FP32_GRAD_RTOL, see tests/tolerances.py) rounded to
# the dtype, then scaled by v_i in backward and rounded again: scaled_grad_rtol.
FP32_GRAD_RTOL = 1e-5
GRAD_RTOL = {dtype: scaled_grad_rtol(dtype, FP32_GRAD_RTOL) for dtype in (torch.float32, torch.bfloat16, torch.float16)}


def row_count(num_classes):
    return max(3, min(64, 2**19 // num_classes))


def make_inputs(n, c, dtype, with_target, with_teacher, with_ref, *, seed=0, layout="contiguous"):
    """Logits in dtype (contiguous, row-padded or misaligned by one element) and a target with ignored rows."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def logits():
        if layout == "contiguous":
            return (3 * torch.randn(n, c, generator=g, device="cuda")).to(dtype)
        wide = (3 * torch.randn(n, c + 3, generator=g, device="cuda")).to(dtype)
        return wide[:, 1 : c + 1] if layout == "misaligned" else wide[:, :c]

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


def assert_matches_reference(student, target, teacher, reference, weighting, temperature=2.5, **kw):
    got_rows, got_grad = run_loss("cuda", student, target, teacher, reference, weighting, temperature, **kw)
    as64 = lambda x: None if x is None else x.double()  # noqa: E731
    want_rows, want_grad = run_loss("reference", as64(student), target, as64(teacher), as64(reference), weighting,
                                    temperature)
    c = student.shape[-1]
    value_atol = 2e-5 * (1 + temperature**2) * torch.log(torch.tensor(c + 2.0)).item()
    for name, want in want_rows.items():
        assert got_rows[name].dtype == torch.float32, name
        torch.testing.assert_close(got_rows[name].double(), want, atol=value_atol, rtol=1e-4, msg=name)
    assert got_grad.dtype == student.dtype
    torch.testing.assert_close(got_grad.double(), want_grad, atol=2e-6 * (1 + temperature**2),
                               rtol=GRAD_RTOL[student.dtype])


@pytest.mark.parametrize("inputs", INPUTS, ids=lambda i: "-".join(str(x) for x in i))
@pytest.mark.parametrize("num_classes", CLASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(dtype, num_classes, inputs):
    with_target, with_teacher, with_ref, weighting = inputs
    tensors = make_inputs(row_count(num_classes), num_classes, dtype, with_target, with_teacher, with_ref)
    assert_matches_reference(*tensors, weighting)


@pytest.mark.parametrize("layout", ["padded", "misaligned"])
@pytest.mark.parametrize("num_classes", [100, 2049, 32000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_and_misaligned_rows(dtype, num_classes, layout):
    tensors = make_inputs(17, num_classes, dtype, True, True, True, layout=layout)
    assert tensors[0].stride(0) == num_classes + 3
    assert_matches_reference(*tensors, "inverse_tcp")


@pytest.mark.parametrize("temperature", [1.0, 0.5, 8.0])
def test_temperatures(temperature):
    tensors = make_inputs(33, 4096, torch.bfloat16, True, True, True)
    assert_matches_reference(*tensors, "inverse_tcp", temperature=temperature)


def test_leading_dimensions_are_flattened():
    student, _, teacher, reference = make_inputs(24, 500, torch.float32, False, True, True)
    target = torch.randint(0, 500, (4, 6), device="cuda")
    shape = (4, 6, 500)
    assert_matches_reference(student.reshape(shape), target, teacher.reshape(shape), reference.reshape(shape),
                             "tcp")


def test_masked_classes_with_minus_infinity():
    student, target, teacher, reference = make_inputs(9, 3000, torch.float32, True, True, True)
    teacher[:, ::7] = float("-inf")
    reference[:, 1::11] = float("-inf")
    assert_matches_reference(student, target, teacher, reference, "inverse_tcp")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inputs", INPUTS, ids=lambda i: "-".join(str(x) for x in i))
@pytest.mark.parametrize("temperature", [1.0, 2.5, 4.0])
def test_one_class_gives_exact_zeros(temperature, inputs, dtype):
    """C = 1: softmax is exactly 1, so every loss term and the gradient are exactly 0 (and the
    teacher's true-class probability exactly 1), not a rounding residue of lse(s) - s."""
    with_target, with_teacher, with_ref, weighting = inputs
    student, target, teacher, reference = make_inputs(64, 1, dtype, with_target, with_teacher, with_ref)
    rows, grad = run_loss("cuda", student, target, teacher, reference, weighting, temperature)
    for name in ("loss", "ce", "kd", "ref"):
        if name in rows:
            assert torch.count_nonzero(rows[name]).item() == 0, (name, rows[name][rows[name] != 0][:5].tolist())
    assert torch.count_nonzero(grad).item() == 0, grad[grad != 0][:5].tolist()
    if with_target and with_teacher:
        valid = target != -100
        assert bool((rows["tcp"][valid] == 1).all()), rows["tcp"][valid][rows["tcp"][valid] != 1][:5].tolist()


def test_all_rows_ignored_gives_zero_loss_and_gradient():
    student, target, teacher, reference = make_inputs(8, 300, torch.bfloat16, True, True, True)
    target.fill_(-100)
    student = student.requires_grad_(True)
    out = smskd_fast.smskd_loss(student, target, teacher, reference, backend="cuda")
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(student.grad).item() == 0


def test_empty_batch():
    student = torch.empty(0, 10, device="cuda", requires_grad=True)
    out = smskd_fast.smskd_loss(student, torch.empty(0, dtype=torch.long, device="cuda"), backend="cuda",
                                reduction="sum")
    out.loss.backward()
    assert out.loss.item() == 0.0 and student.grad.shape == (0, 10)


def test_int32_target():
    student, target, teacher, reference = make_inputs(10, 64, torch.float32, True, True, True)
    assert_matches_reference(student, target.int(), teacher, reference, "inverse_tcp")


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
