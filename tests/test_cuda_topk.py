"""The CUDA kernel of smskd_fast::smskd_loss_rows_topk, on a GPU: registration, errors, bad indices,
the device assert, deterministic mode, opcheck.

The value and gradient cases every backend shares (the ladder of row layouts with k
from 1 to C, strided and misaligned rows, no rest, an infinite rest term against the
CPU kernel, fp16 caches with int32 indices, the public API) are in
tests/test_backend_conformance.py. Oracles here: tests/topk_cases.py's float64
reference backend; torch.library.opcheck. The first test needs only a CUDA build of
smskd_fast._C (no GPU); the others skip without a CUDA device, with the reason.
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
from topk_cases import make_inputs, run_reference
from topk_tolerance import assert_matches_reference

CUDA_STATUS = smskd_fast.available_backends()["cuda"]
gpu = pytest.mark.skipif(not CUDA_STATUS, reason=f"cuda backend unavailable: {CUDA_STATUS.reason}")


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
