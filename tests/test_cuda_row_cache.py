"""The CUDA row cache (SMSKD_FAST_CUDA_ROW_CACHE_BYTES) on a GPU: keeping a row's packs in shared
memory between the kernel's sweeps changes where sweep 2 reads them, never a value.

Oracle: the same call without the cache, bit for bit (every per-row output, the reduced outputs and
the gradient), over the block-per-row layouts (256 threads: C <= 16384, 512 beyond), rows kept
whole and in part (a byte cap, or a row longer than shared memory holds), every input combination,
the in-place gradient, and rows the packed path cannot take (the cache is then ignored); and that the
launch does keep the packs (its shared memory in the profiler's trace). Its values
against the float64 reference are those of the uncached kernel (tests/test_backend_conformance.py).
The per-thread arithmetic of the cache runs without a GPU in kernels/tests/test_row_math_host.cu.
Skipped without a CUDA device or without a CUDA build of smskd_fast._C.
"""
import json
import re

import pytest
import torch

import smskd_fast
from conftest import assert_bitwise_equal
from test_cuda_backend import make_inputs

CUDA_STATUS = smskd_fast.available_backends()["cuda"]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA_STATUS, reason=f"cuda backend unavailable: {CUDA_STATUS.reason}"),
]

VARIABLE = "SMSKD_FAST_CUDA_ROW_CACHE_BYTES"
# (N, C, dtype, cache request): a 256-thread row kept whole; 512-thread rows kept whole, capped at
# 50000 bytes (part of the row), and longer than any GPU's shared memory per block (part of it).
CASES = [
    (5, 3000, torch.float32, "max"),
    (4, 20000, torch.bfloat16, "max"),
    (6, 20000, torch.float32, "50000"),
    (3, 20011, torch.float16, "max"),
    (2, 262144, torch.bfloat16, "max"),
]
INPUTS = {"all": (True, True, True), "teacher": (True, True, False), "reference": (True, False, True),
          "ce only": (True, False, False), "kd only": (False, True, False)}


def run(student, target, teacher, reference, reduction, *, overwrite=False):
    """Outputs and gradient of the cuda backend (on a clone of the student: overwrite consumes its logits)."""
    leaf = student.detach().clone().requires_grad_(True)
    logits = leaf * 1 if overwrite else leaf  # a non-leaf, as an lm head's output, may be overwritten
    options = dict(temperature=2.5, reduction=reduction, backend="cuda")
    if overwrite:
        options["overwrite_student_logits"] = True
    if target is None:
        loss = smskd_fast.kd_loss(logits, teacher, **options)
        outputs = [loss]
    else:
        out = smskd_fast.smskd_loss(logits, target, teacher, reference, ce_weight=0.7, kd_weight=1.3, ref_weight=0.9,
                                    weighting="inverse_tcp" if teacher is not None else "constant", **options)
        loss, outputs = out.loss, [out.loss, out.ce, out.kd, out.ref, out.tcp, out.weight]
    weights = torch.linspace(0.5, 1.5, loss.numel(), device="cuda").reshape(loss.shape)
    (loss * weights).sum().backward()
    return [o.detach().clone() for o in outputs] + [leaf.grad.clone()]


def assert_all_bitwise_equal(got, want):
    for k, (a, b) in enumerate(zip(got, want)):
        assert_bitwise_equal(a.reshape(-1), b.reshape(-1), f"output {k} of {len(got)} differs with the row cache")


def with_and_without(monkeypatch, request, call):
    monkeypatch.delenv(VARIABLE, raising=False)
    without = call()
    monkeypatch.setenv(VARIABLE, request)
    with_cache = call()
    torch.cuda.synchronize()
    return with_cache, without


@pytest.mark.parametrize("n, c, dtype, request_bytes", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("inputs", list(INPUTS))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_row_cache_changes_no_bit(monkeypatch, n, c, dtype, request_bytes, inputs, reduction):
    student, target, teacher, reference = make_inputs(n, c, dtype, *INPUTS[inputs])
    got, want = with_and_without(monkeypatch, request_bytes,
                                 lambda: run(student, target, teacher, reference, reduction))
    assert_all_bitwise_equal(got, want)


@pytest.mark.parametrize("n, c, dtype, request_bytes", CASES[:3], ids=lambda v: str(v).replace("torch.", ""))
def test_row_cache_with_the_gradient_written_over_the_student(monkeypatch, n, c, dtype, request_bytes):
    student, target, teacher, reference = make_inputs(n, c, dtype, True, True, True)
    got, want = with_and_without(monkeypatch, request_bytes,
                                 lambda: run(student, target, teacher, reference, "mean", overwrite=True))
    assert_all_bitwise_equal(got, want)
    monkeypatch.delenv(VARIABLE)
    plain = run(student, target, teacher, reference, "mean")  # no cache, a new gradient buffer
    assert_all_bitwise_equal(got, plain)


def row_kernel_shared_memory(call, path):
    """Bytes of shared memory (static + dynamic) the dense row kernel launched by call() had, from the
    profiler's trace of the launch."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        call()
        torch.cuda.synchronize()
    profile.export_chrome_trace(str(path))
    launches = [event for event in json.loads(path.read_text())["traceEvents"]
                if event.get("cat") == "kernel" and "smskd_rows_kernel" in event.get("name", "")]
    assert len(launches) == 1, [event.get("name") for event in launches]
    return launches[0]["args"]["shared memory"]


@pytest.mark.parametrize("n, c, dtype, request_bytes, kept_packs", [
    (4, 20000, torch.bfloat16, "max", 20000 // 8),  # the whole row: 2500 packs of 8 columns
    (6, 20000, torch.float32, "50000", 1024),  # 50000 // 48 = 1041 packs, whole pairs of 512 threads
    (6, 20000, torch.float32, "0", 0),
])
def test_the_row_cache_takes_the_shared_memory_it_keeps(monkeypatch, tmp_path, n, c, dtype, request_bytes,
                                                        kept_packs):
    """Not only the same bits: the launch really keeps the packs (3 streams x 16 bytes each)."""
    student, target, teacher, reference = make_inputs(n, c, dtype, True, True, True)

    def call():
        return run(student, target, teacher, reference, "mean")

    call()  # warm-up outside the trace
    monkeypatch.delenv(VARIABLE, raising=False)
    without = row_kernel_shared_memory(call, tmp_path / "without.json")
    monkeypatch.setenv(VARIABLE, request_bytes)
    with_cache = row_kernel_shared_memory(call, tmp_path / "with.json")
    assert with_cache - without == kept_packs * 3 * 16


@pytest.mark.parametrize("offset", [1, 3], ids=lambda o: f"offset{o}")
def test_rows_off_the_packed_path_ignore_the_cache(monkeypatch, offset):
    """A teacher whose rows start at another offset modulo 16 bytes puts the launch on the scalar
    path, where nothing is kept: the same bits as without the cache."""
    n, c = 4, 20000
    g = torch.Generator(device="cuda").manual_seed(offset)

    def wide():
        return (3 * torch.randn(n, c + 8, generator=g, device="cuda")).to(torch.bfloat16)

    student, teacher, reference = wide()[:, :c], wide()[:, offset:offset + c], wide()[:, :c]
    target = torch.randint(0, c, (n,), generator=g, device="cuda")
    got, want = with_and_without(monkeypatch, "max", lambda: run(student, target, teacher, reference, "none"))
    assert_all_bitwise_equal(got, want)


@pytest.mark.parametrize("value", ["lots", "-1", "12.5", "1e5"])
def test_a_bad_row_cache_request_names_the_variable(monkeypatch, value):
    student, target, teacher, reference = make_inputs(2, 3000, torch.float32, True, True, True)
    monkeypatch.setenv(VARIABLE, value)
    message = f"{VARIABLE} must be a number of bytes >= 0 or \"max\", got '{value}'"
    with pytest.raises(ValueError, match=re.escape(message)):
        run(student, target, teacher, reference, "mean")
