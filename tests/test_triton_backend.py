"""The triton backend's own tests: forced launch configurations, the in-place gradient, errors, op registration.

The value and gradient cases every backend shares (shapes up to C = 262144 on a GPU,
weightings, subsets of the inputs, half precision, -inf masks, strided rows, ignored
rows, reductions, C = 1) are in tests/test_backend_conformance.py.
Where the cases run (tests/triton_interpreter.py): with a CUDA device, in this
process on CUDA tensors; without one, under Triton's interpreter on CPU tensors in a
subprocess, with small shapes (test_cases_under_the_interpreter).
Tolerances: tests/tolerances.py (backend_tolerance("triton", ...)).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import smskd_fast
from smskd_fast.backends.base import LossOptions, RowInputs
from smskd_fast.backends.reference import ReferenceBackend
from tolerances import backend_tolerance
from triton_interpreter import (DEVICE, INTERPRETED, ON_GPU, ROOT, gpu_only, needs_kernels, reruns_under_interpreter,
                                run_under_interpreter)

def make_inputs(n, c, dtype=torch.float32, seed=0, leading=None):
    generator = torch.Generator().manual_seed(seed)
    shape = (*(leading or (n,)), c)

    def logits(scale):
        return (torch.randn(shape, generator=generator) * scale).to(dtype).to(DEVICE)

    target = torch.randint(0, c, shape[:-1], generator=generator).to(DEVICE)
    return logits(3.0), target, logits(3.0), logits(2.0)


def reference_rows(student, target, teacher, reference, options):
    """Per-row terms and d sum(loss) / d student from the float64 reference."""
    s64 = student.detach().double().requires_grad_()
    rows = ReferenceBackend().rows(
        RowInputs(s64, target, None if teacher is None else teacher.double(),
                  None if reference is None else reference.double()),
        options,
    )
    (grad,) = torch.autograd.grad(rows.loss.sum(), s64)
    return rows, grad


def triton_rows(student, target, teacher, reference, options):
    outputs = torch.ops.smskd_fast.smskd_loss_rows_triton(
        student, target, teacher, reference, options.temperature, options.ce_weight, options.kd_weight,
        options.ref_weight, options.weighting, options.ignore_index, True,
    )
    return outputs


def triton_tolerance(dtype=torch.float32, temperature=4.0):
    """(values, gradient) tolerances of the triton kernels against float64 (tests/tolerances.py)."""
    return backend_tolerance("triton", dtype, temperature=temperature, num_classes=0, topk=False, row_weights=False,
                             max_abs_logit=0.0, weight_sum=0.0, grad_scale=0.0)


def assert_rows_match(outputs, expected, expected_grad, dtype):
    value_tol, grad_tol = triton_tolerance(dtype)
    names = ("loss", "ce", "kd", "ref", "tcp", "weight")
    for name, got in zip(names, outputs[:6]):
        want = getattr(expected, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), want, **value_tol, msg=name)
    grad = outputs[6]
    assert grad.dtype == dtype and grad.shape == expected_grad.shape
    torch.testing.assert_close(grad.double(), expected_grad, **grad_tol)


def assert_compiled_matches_eager(loss_fn, student, backend):
    """torch.compile(loss_fn, fullgraph=True) gives the loss and student gradient that loss_fn gives eagerly."""
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    s1 = student.detach().clone().requires_grad_()
    s2 = student.detach().clone().requires_grad_()
    got = compiled(s1)
    got.backward()
    want = loss_fn(s2)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize("maxima", ["per_pack", "per_block"])
@pytest.mark.parametrize("block_c", [16, 128])
def test_online_kernel_with_many_partial_blocks(block_c, maxima):
    """C = 300 is no multiple of the block: the last block is partial, the maxima grow across blocks; with
    a maximum per 16-byte pack (the default) and per block (OnlineConfig.maxima_columns = block_c)."""
    from smskd_fast.backends.triton import launch as triton_launch

    student, target, teacher, reference = make_inputs(4, 300, seed=3)
    student[:, 250:] += 8.0  # the running maximum must be rescaled late in the row
    teacher[2, :200] = float("-inf")  # whole packs and blocks without probability: their sums add 0
    target[1] = -100
    options = LossOptions(temperature=3.0)
    expected, grad = reference_rows(student, target, teacher, reference, options)
    outputs = triton_launch.launch_rows(
        student, target, teacher, reference, 3.0, 1.0, 1.0, 1.0, "inverse_tcp", -100, True,
        config=triton_launch.OnlineConfig(block_c, 4, maxima_columns=block_c if maxima == "per_block" else 0),
    )
    assert_rows_match(outputs, expected, grad, torch.float32)


@needs_kernels
def test_online_kernel_on_rows_off_16_byte_boundaries():
    """Logits viewed from a flat buffer at an odd element (storage offset 1): the launcher's ROW_ALIGN is 1,
    so the kernel keeps one maximum per block (online_pack), and the rows match the float64 reference."""
    from smskd_fast.backends.triton import launch as triton_launch

    student, target, teacher, reference = make_inputs(4, 320, seed=5)
    student[:, 200:] += 6.0
    shifted = [torch.cat([x.new_zeros(1), x.reshape(-1)])[1:].view(x.shape) for x in (student, teacher, reference)]
    assert triton_launch.logits_row_alignment(320, shifted) == 1
    assert triton_launch.OnlineConfig(64, 4).pack(shifted[0].element_size(), 1) == 64
    options = LossOptions(temperature=2.0)
    expected, grad = reference_rows(student, target, teacher, reference, options)
    outputs = triton_launch.launch_rows(shifted[0], target, shifted[1], shifted[2], 2.0, 1.0, 1.0, 1.0,
                                        "inverse_tcp", -100, True, config=triton_launch.OnlineConfig(64, 4))
    assert_rows_match(outputs, expected, grad, torch.float32)


def test_online_maxima_are_per_16_byte_pack_only_where_rows_allow_16_byte_loads():
    """A pack is one thread's 16-byte load; rows whose C, strides or offsets break 16-byte alignment
    (logits_row_alignment) take one maximum per block instead (a pack would spread over threads:
    benchmarks/triton_loop_sync.py). The kernels and the launchers share the rule (kernels.sixteen_byte_loads)."""
    triton_launch = pytest.importorskip("smskd_fast.backends.triton.launch")
    kernels = pytest.importorskip("smskd_fast.backends.triton.kernels")
    assert [kernels.sixteen_byte_loads(align, bits) for align, bits in ((16, 16), (8, 16), (4, 32), (4, 16), (2, 32))] \
        == [True, True, True, False, False]
    rows = torch.zeros(2 * 32000 + 8)
    assert triton_launch.logits_row_alignment(32000, (rows[:64000].view(2, 32000), None)) == 16
    assert triton_launch.logits_row_alignment(32000, (rows[8:].view(2, 32000), None)) == 8  # storage offset 8
    assert triton_launch.logits_row_alignment(32000, (rows[:64000].view(2, 32000), rows[2:64002].view(2, 32000))) == 2
    assert triton_launch.logits_row_alignment(1000, (rows[:64000].view(32, 2000)[:, :1000],)) == 8  # C = 1000
    config = triton_launch.OnlineConfig(2048, 8)
    assert (config.pack(2), config.pack(4)) == (8, 4)
    assert (config.pack(2, triton_launch.row_alignment(32000, 32000)), config.pack(4, 4)) == (8, 4)
    assert config.pack(2, triton_launch.row_alignment(50257, 50257)) == 2048  # GPT-2's vocabulary
    assert (config.pack(2, 4), config.pack(4, 2)) == (2048, 2048)
    assert triton_launch.OnlineConfig(2048, 8, maxima_columns=2048).pack(2) == 2048
    assert triton_launch.OnlineConfig(4, 1).pack(2) == 4  # a block narrower than a pack is one pack
    for block_c, maxima_columns in ((48, 0), (64, 32 + 16), (64, 128)):
        with pytest.raises(ValueError, match="block_c|maxima_columns"):
            triton_launch.OnlineConfig(block_c, 4, maxima_columns=maxima_columns)


def test_temperature_power_is_chosen_as_the_cuda_launcher_chooses():
    temperature_power = pytest.importorskip("smskd_fast.backends.triton.kernels").temperature_power

    assert [temperature_power(t, True, True) for t in (1.0, 2.0, 2.5, 4.0, 0.5)] == [1, 2, 0, 0, 0]
    assert temperature_power(2.0, False, True) == 0 and temperature_power(1.0, True, False) == 0  # nothing to share
    # compared in float32, as the kernels (and csrc/cuda's float argument) see T
    assert temperature_power(2.0 + 1e-12, True, True) == 2
    assert temperature_power(float(torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))), True, True) == 0


@needs_kernels
@pytest.mark.parametrize("temperature", [1.0, 2.0, 2.5, 4.0])
def test_one_class_gives_exact_zeros_in_the_online_kernel(temperature):
    """C = 1 in the online kernel (forced): every loss term and the gradient are exactly 0, not a rounding
    residue of lse(t/T) - lse(s/T). The launch table's kernel: test_backend_conformance.py."""
    from smskd_fast.backends.triton import launch as triton_launch

    student, target, teacher, reference = make_inputs(16, 1, seed=5)
    target[3] = -100
    config = {"config": triton_launch.OnlineConfig(16, 4)}
    for weighting, kd_weight in (("inverse_tcp", 1.3), ("tcp", 1.3), ("constant", 0.0)):
        outputs = triton_launch.launch_rows(student, target, teacher, reference, temperature, 0.7, kd_weight, 0.9,
                                            weighting, -100, True, **config)
        for name, value in zip(("loss", "ce", "kd", "ref"), outputs[:4]):
            assert torch.count_nonzero(value).item() == 0, (weighting, name, value[value != 0].tolist())
        assert torch.count_nonzero(outputs[6]).item() == 0, (weighting, "grad")


@needs_kernels
@pytest.mark.parametrize("c", [40, 4100])
def test_overwrite_student_logits_stores_the_gradient_in_place(c):
    student, target, teacher, reference = make_inputs(5, c, seed=5)
    leaf = student.detach().clone().requires_grad_()
    expected = smskd_fast.smskd_loss(leaf, target, teacher, reference, backend="reference")
    (3.0 * expected.loss).backward()

    logits_leaf = student.detach().clone().requires_grad_()
    logits = logits_leaf * 1.0  # e.g. the output of a model's last layer
    storage = logits.data_ptr()
    out = smskd_fast.smskd_loss(logits, target, teacher, reference, backend="triton",
                                overwrite_student_logits=True)
    (3.0 * out.loss).backward(retain_graph=True)
    value_tol, grad_tol = triton_tolerance()
    torch.testing.assert_close(out.loss, expected.loss, **value_tol)
    torch.testing.assert_close(logits_leaf.grad, leaf.grad, **grad_tol)
    # The logits' own memory now holds the scaled gradient: no N x C buffer was allocated.
    assert logits.data_ptr() == storage
    torch.testing.assert_close(logits.detach(), leaf.grad, **grad_tol)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        out.loss.backward()


@needs_kernels
def test_out_of_range_target_is_an_error():
    student, target, teacher, reference = make_inputs(3, 9)
    target[1] = 9
    if INTERPRETED:
        # The interpreter has no debug mode for tl.device_assert; the launcher checks on the host.
        with pytest.raises(ValueError, match=r"target values must be in \[0, 9\)"):
            triton_rows(student, target, teacher, reference, LossOptions())
    else:
        result = run_bad_target_subprocess(compiled=False)
        assert "device-side assert" in result.stderr or "target out of range" in result.stdout + result.stderr, \
            result.stderr[-2000:]


@gpu_only
def test_out_of_range_target_fails_under_torch_compile():
    """Inductor re-jits the check kernel without debug (assert compiled out): its trap must still fire."""
    run_bad_target_subprocess(compiled=True)


def run_bad_target_subprocess(compiled: bool) -> subprocess.CompletedProcess:
    """A device-side assert or trap kills the CUDA context, so it is provoked in a child process."""
    code = textwrap.dedent(f"""
        import torch, smskd_fast
        s = torch.randn(3, 9, device="cuda")
        y = torch.tensor([0, 9, 1], device="cuda")
        def loss(s):
            return smskd_fast.smskd_loss(s, y, s, s, backend="triton").loss
        fn = torch.compile(loss, fullgraph=True) if {compiled} else loss
        out = fn(s)
        torch.cuda.synchronize()
        print("NO ERROR", out)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode != 0 and "NO ERROR" not in result.stdout, result.stdout + result.stderr
    return result


@needs_kernels
def test_float64_is_refused_with_the_alternatives():
    student, target, teacher, reference = make_inputs(2, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"use backend='reference' for float64 \(or 'cpu' for CPU tensors\)"):
        smskd_fast.smskd_loss(student, target, teacher, reference, backend="triton")


@needs_kernels
@pytest.mark.parametrize("c", [20] if INTERPRETED else [20, 100, 5000])  # the GPU adds wider tiles, the online kernel
def test_opcheck(c):
    student, target, teacher, reference = make_inputs(4, c)
    args = (student.requires_grad_(), target, teacher, reference, 2.0, 1.0, 1.0, 1.0, "inverse_tcp", -100, True)
    if INTERPRETED:
        # AOT dispatch would run the interpreted kernels on fake tensors; only the GPU runs those checks.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    else:
        utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.smskd_fast.smskd_loss_rows_triton, args, test_utils=utils)


@needs_kernels
def test_torch_compile_fullgraph():
    student, target, teacher, reference = make_inputs(6, 300 if INTERPRETED else 32000)
    # Inductor compiles the kernels on the GPU; under the interpreter Dynamo captures the
    # full graph (through the fake kernel) and runs it eagerly.
    backend = "eager" if INTERPRETED else "inductor"

    def loss_fn(s):
        return smskd_fast.smskd_loss(s, target, teacher, reference, backend="triton").loss

    assert_compiled_matches_eager(loss_fn, student, backend)


def test_status_says_why():
    status = smskd_fast.available_backends()["triton"]
    if INTERPRETED:
        assert status.available and "TRITON_INTERPRET=1" in status.reason
    elif ON_GPU:
        assert status.available
    else:
        assert not status.available and status.reason


def test_a_triton_without_constexpr_function_is_a_status_not_a_crash():
    """The kernels need triton.constexpr_function (triton >= 3.5): an older triton leaves the backend
    unavailable with a status that says so, and the package imports."""
    pytest.importorskip("triton")
    probe = textwrap.dedent("""
        import triton
        del triton.constexpr_function
        import smskd_fast
        status = smskd_fast.available_backends()["triton"]
        print(status.available, status.reason)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("False ") and "triton >= 3.5" in result.stdout, result.stdout


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file under TRITON_INTERPRET=1 in a fresh interpreter (see tests/triton_interpreter.py)."""
    run_under_interpreter(__file__)


@gpu_only
def test_overwrite_student_logits_allocates_no_gradient_buffer():
    """Forward+backward peak memory: the functional op allocates an N x C gradient, the overwrite path none."""
    n, c = 256, 32000
    student, target, teacher, reference = make_inputs(n, c, dtype=torch.bfloat16)
    grad_bytes = n * c * student.element_size()
    extra = {}
    for overwrite in (False, True):
        leaf = student.detach().clone().requires_grad_()
        logits = leaf * 1.0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        out = smskd_fast.smskd_loss(logits, target, teacher, reference, backend="triton",
                                    overwrite_student_logits=overwrite)
        torch.autograd.grad(out.loss, logits)
        extra[overwrite] = torch.cuda.max_memory_allocated() - baseline
    assert extra[False] >= grad_bytes
    assert extra[True] < grad_bytes / 4, extra
