"""The CUDA kernel of smskd_fast::smskd_loss_rows_topk against the float64 reference, on a GPU.

Oracles: tests/topk_cases.py's float64 reference backend (its gradient by
autograd) on the same, exactly upcast, values; the C++ CPU kernel for the edge
cases whose results are not finite (R = 0); torch.library.opcheck.
The first test needs only a CUDA build of smskd_fast._C (no GPU); the others
skip without a CUDA device, with the reason.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import smskd_fast
from smskd_fast.ops import registration as ops
from smskd_fast.ops.extension import extension_loaded
from smskd_fast.backends import registry
from smskd_fast.backends.base import LossOptions
from smskd_fast.backends.native import CompiledOpBackend
from smskd_fast.backends.topk import TopKTeacher
from gpu_child import assert_fails_loudly, run_child
from topk_cases import FIELDS, make_inputs, no_rest_mass_case, run_reference
from tolerances import grad_tolerance, loss_tolerance
from topk_tolerance import assert_matches_reference

CUDA_STATUS = smskd_fast.available_backends()["cuda"]
gpu = pytest.mark.skipif(not CUDA_STATUS, reason=f"cuda backend unavailable: {CUDA_STATUS.reason}")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Every row layout (8 lanes <= 128 < 16 lanes <= 512 < warp <= 2048 < 256-thread block <= 16384 <
# 512-thread block), odd sizes for unaligned heads and tails, LLM vocabularies.
CLASSES = (1, 7, 100, 129, 513, 2049, 5003, 16385, 32000, 50257, 131072)
INPUTS = {"target+reference": (True, True, "inverse_tcp"), "target": (True, False, "tcp"),
          "reference": (False, True, "constant"), "neither": (False, False, "constant")}


def has_cuda_kernel(op_name):
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(op_name, "CUDA")


def topk_op():
    """The operator, looked up when used: without a built smskd_fast._C it does not exist."""
    return torch.ops.smskd_fast.smskd_loss_rows_topk


def run_op(student, target, topk, reference, options, compute_grad=True):
    return topk_op()(student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
              topk.log_sum_exp_at_temperature, reference, options.temperature, options.ce_weight,
              options.kd_weight, options.ref_weight, options.weighting, options.ignore_index, compute_grad)


def to_device(student, target, topk, reference, device="cuda"):
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    teacher = TopKTeacher(*(t.to(device) for t in (topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
                                                    topk.log_sum_exp_at_temperature)))
    return move(student), move(target), teacher, move(reference)


def check(student, target, topk, reference, options, what=""):
    """Runs the CUDA op on the (CPU) inputs and compares it with the float64 reference."""
    expected, expected_grad = run_reference(student, target, topk, reference, options)
    *per_row, grad = run_op(*to_device(student, target, topk, reference), options)
    assert all(v.dtype == torch.float32 and v.is_cuda for v in per_row)
    assert_matches_reference(per_row, grad, expected, expected_grad, student, options, what=what)


@pytest.mark.skipif(not has_cuda_kernel(ops.OP_NAME),
                    reason="smskd_fast._C has no CUDA kernels (built with SMSKD_FAST_NO_CUDA=1, or without nvcc)")
def test_a_cuda_build_registers_the_top_k_kernel():
    assert has_cuda_kernel(ops.TOPK_OP_NAME)
    assert CompiledOpBackend("cuda", device_type="cuda", dispatch_key="CUDA", float64=False).supports_topk


@gpu
def test_the_cuda_backend_accepts_a_top_k_teacher():
    assert registry.get_backend("cuda", torch.device("cuda"), topk=True).name == "cuda"
    chosen = registry.resolve_backend("auto", torch.device("cuda"), torch.bfloat16, 32000, topk=True)
    assert chosen.name in ("cuda", "triton") and registry.supports_topk(chosen)


@gpu
@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("num_classes", CLASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_the_float64_reference(dtype, num_classes, inputs):
    with_target, with_reference, weighting = INPUTS[inputs]
    n = max(3, min(48, 2**18 // num_classes))
    options = LossOptions(temperature=4.0 if num_classes % 2 else 1.0, ce_weight=0.3, kd_weight=0.9, ref_weight=0.7,
                          weighting=weighting)
    # k = 1, k below and above the threads of a row, and k = C (no rest) where C is small.
    for k in sorted({1, min(8, num_classes), min(300, num_classes), num_classes if num_classes <= 513 else 1}):
        inputs = make_inputs(n, num_classes, k, dtype, seed=k, temperature=options.temperature,
                             with_target=with_target, with_reference=with_reference)
        check(*inputs, options, what=f"k={k}:")


@gpu
@pytest.mark.parametrize("layout", ["padded", "misaligned", "column-strided"])
@pytest.mark.parametrize("num_classes", [100, 2049, 32000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_and_misaligned_rows(dtype, num_classes, layout):
    student, target, topk, reference = make_inputs(17, num_classes, 20, dtype, seed=3, temperature=2.0)
    options = LossOptions(temperature=2.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.5)
    expected, expected_grad = run_reference(student, target, topk, reference, options)

    def laid_out(x):
        if layout == "column-strided":
            return x.t().contiguous().cuda().t()
        wide = torch.zeros(x.shape[0], x.shape[1] + 3, dtype=x.dtype, device="cuda")
        offset = 1 if layout == "misaligned" else 0
        wide[:, offset:offset + x.shape[1]] = x.cuda()
        return wide[:, offset:offset + x.shape[1]]

    _, target_c, topk_c, _ = to_device(student, target, topk, reference)
    *per_row, grad = run_op(laid_out(student), target_c, topk_c, laid_out(reference), options)
    assert_matches_reference(per_row, grad, expected, expected_grad, student, options)


@gpu
def test_teacher_fields_in_other_dtypes_and_int32_indices():
    """An fp16 cache (values, true logit, log-sum-exps) with int32 indices, and an int32 target."""
    student, target, topk, reference = make_inputs(12, 1000, 16, torch.bfloat16, seed=5)
    half = TopKTeacher(topk.values.half(), topk.indices.int(), topk.true_logit.half(), topk.log_sum_exp.half(),
                       topk.log_sum_exp_at_temperature.half())
    options = LossOptions(temperature=4.0, ce_weight=0.3, kd_weight=0.9, ref_weight=0.7)
    expected, expected_grad = run_reference(student, target, half, reference, options)
    *per_row, grad = run_op(*to_device(student, target.int(), half, reference), options)
    assert_matches_reference(per_row, grad, expected, expected_grad, student, options)


@gpu
def test_no_rest_mass_and_k_equal_to_c():
    """p_rest = 0 (the kept classes hold all the teacher's mass), and k = C for a block-per-row C."""
    student, target, _, reference = make_inputs(4, 3000, 2, torch.float32, seed=7)
    teacher = torch.full((4, 3000), -1e4)
    teacher[:, :2] = torch.tensor([3.0, 1.0])
    options = LossOptions(temperature=1.0, ce_weight=0.5, kd_weight=1.0, ref_weight=0.3, weighting="constant")
    check(student, target, TopKTeacher.from_logits(teacher, target, 2, 1.0), reference, options, what="p_rest=0:")
    student, target, topk, reference = make_inputs(5, 3000, 3000, torch.bfloat16, seed=8)
    check(student, target, topk, reference, LossOptions(temperature=4.0), what="k=C:")


@gpu
def test_student_mass_off_the_kept_classes_underflows_as_on_the_cpu():
    """R = 0 (every non-kept student logit is -inf): the rest term is infinite, as the CPU kernel gives."""
    if not smskd_fast.available_backends()["cpu"]:
        pytest.skip("the C++ CPU kernel (the oracle of this case) is not built")
    student, target, topk, options = no_rest_mass_case()
    want = run_op(student, target, topk, None, options)
    got = run_op(*to_device(student, target, topk, None), options)
    assert torch.isinf(want[2][0])  # the case is what it claims
    for name, g, w in zip(FIELDS + ("grad",), got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)


@gpu
def test_public_api_runs_the_cuda_kernel_with_autograd():
    student, target, topk, reference = make_inputs(16, 5003, 32, torch.bfloat16, seed=11)
    results = {}
    for backend, device in (("cuda", "cuda"), ("reference", "cpu")):
        cast = (lambda x: x) if backend == "cuda" else torch.Tensor.double  # noqa: E731
        s, y, t, r = to_device(cast(student), target, topk, cast(reference), device)
        s = s.detach().requires_grad_(True)
        out = smskd_fast.smskd_loss(s, y, None, r, teacher_topk=t, backend=backend)
        out.loss.backward()
        results[backend] = (out.loss.detach().cpu().double(), s.grad.cpu().double())
    max_abs = float(student.double().abs().max())
    torch.testing.assert_close(results["cuda"][0], results["reference"][0], rtol=1e-5,
                               atol=loss_tolerance(max_abs, 4.0, 3.0, student.shape[-1])[1])  # the defaults: T = 4, weights 1
    # mean over the valid rows: each row's gradient (at most 1 + 2T) divided by their count
    scale = (1 + 2 * 4.0) / int((target != -100).sum())
    torch.testing.assert_close(results["cuda"][1], results["reference"][1], rtol=0,
                               atol=grad_tolerance(torch.bfloat16, max_abs, 4.0, scale)[1])


@gpu
@pytest.mark.parametrize("n, c, k, compute_grad", [(3, 5, 2, True), (1, 1, 1, True), (4, 33, 33, False),
                                                   (0, 8, 3, True), (5, 3000, 40, True)])
def test_opcheck(n, c, k, compute_grad):
    student, target, topk, reference = to_device(*make_inputs(n, c, k, torch.float32))
    student.requires_grad_(compute_grad)
    options = LossOptions(temperature=3.0, ce_weight=0.5, kd_weight=0.8, ref_weight=0.6)
    args = (student, target, topk.values, topk.indices, topk.true_logit, topk.log_sum_exp,
            topk.log_sum_exp_at_temperature, reference, options.temperature, options.ce_weight, options.kd_weight,
            options.ref_weight, options.weighting, options.ignore_index, compute_grad)
    torch.library.opcheck(topk_op().default, args)


@gpu
def test_bad_inputs_are_refused_with_the_argument_named():
    student, target, topk, reference = to_device(*make_inputs(4, 6, 3, torch.float32))
    options = LossOptions()
    with pytest.raises(TypeError, match="got float64; use backend='reference'"):
        run_op(student.double(), target, topk, reference.double(), options)
    with pytest.raises(ValueError, match="true_logit must have shape"):
        run_op(student, target, replace(topk, true_logit=topk.true_logit[:3]), reference, options)
    with pytest.raises(ValueError, match=r"topk_values must have shape \(4, k\)"):
        run_op(student, target, replace(topk, values=topk.values[:, :0]), reference, options)
    with pytest.raises(TypeError, match="topk_indices must hold integer"):
        run_op(student, target, replace(topk, indices=topk.indices.float()), reference, options)
    with pytest.raises(RuntimeError, match="log_sum_exp must be on the student's device"):
        run_op(student, target, replace(topk, log_sum_exp=topk.log_sum_exp.cpu()), reference, options)
    with pytest.raises(TypeError, match="reference must have the student's dtype"):
        run_op(student, target, topk, reference.half(), options)
    with pytest.raises(ValueError, match="weighting must be"):
        run_op(student, target, topk, reference, LossOptions(weighting="square"))


@gpu
def test_bad_indices_never_fault():
    """Out-of-range and duplicate indices (which validation refuses) give some numbers, never a fault."""
    student, target, topk, reference = to_device(*make_inputs(8, 500, 16, torch.float32))
    options = LossOptions()
    for bad in (topk.indices + 500, topk.indices - 1000, torch.zeros_like(topk.indices)):
        run_op(student, target, replace(topk, indices=bad), reference, options)
    torch.cuda.synchronize()  # a fault would surface here, and poison the next check
    check(*make_inputs(8, 500, 16, torch.float32), options, what="after bad indices:")


@gpu
def test_target_out_of_range_trips_the_device_assertion():
    """As the dense CUDA op: a loud device-side assertion, run in a child process (it poisons the context)."""
    result = run_child("""
        import torch, smskd_fast
        from smskd_fast.backends.topk import TopKTeacher
        s = torch.randn(4, 10, device="cuda")
        t = torch.tensor([1, 2, 10, 3], device="cuda")
        topk = TopKTeacher.from_logits(torch.randn(4, 10, device="cuda"), t, 3, 1.0)
        smskd_fast.smskd_loss(s, t, teacher_topk=topk, backend="cuda").loss.item()
    """)
    assert_fails_loudly(result, "target out of range", "device-side assert")


@gpu
def test_runs_under_deterministic_algorithms():
    """The kept-class mask is built with scatter_add_, which must not be refused in deterministic mode."""
    inputs = make_inputs(6, 700, 12, torch.float32, seed=13, temperature=2.0)
    options = LossOptions(temperature=2.0)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        check(*inputs, options)
    finally:
        torch.use_deterministic_algorithms(previous)
