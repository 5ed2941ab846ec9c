"""Every bad input to the public loss API gives one clear error naming the argument."""
from __future__ import annotations

import warnings

import pytest
import torch

import smskd_fast
from smskd_fast.backends import registry
from smskd_fast.backends.base import BackendStatus
from conftest import make_logits


@pytest.fixture
def inputs():
    student, target, teacher, reference = make_logits((4, 6), dtype=torch.float32)
    return dict(student_logits=student, target=target, teacher_logits=teacher, reference_logits=reference)


def call(inputs, **overrides):
    args = {**inputs, **{k: v for k, v in overrides.items() if k in inputs}}
    options = {k: v for k, v in overrides.items() if k not in inputs}
    options.setdefault("backend", "reference")
    return smskd_fast.smskd_loss(args["student_logits"], args["target"], args["teacher_logits"],
                                 args["reference_logits"], **options)


@pytest.mark.parametrize("name", ["teacher_logits", "reference_logits"])
def test_logits_shape_mismatch(inputs, name):
    with pytest.raises(ValueError, match=rf"{name} must have the student_logits' shape \(4, 6\), got \(4, 5\)"):
        call(inputs, **{name: torch.zeros(4, 5)})


def test_target_shape_mismatch(inputs):
    with pytest.raises(ValueError, match=r"target must have the leading shape \(4,\).*got \(4, 1\)"):
        call(inputs, target=torch.zeros(4, 1, dtype=torch.long))


@pytest.mark.parametrize("name", ["teacher_logits", "reference_logits"])
def test_mixed_dtypes(inputs, name):
    with pytest.raises(TypeError, match=rf"{name} must have the student_logits' dtype torch.float32, "
                                        r"got torch.bfloat16"):
        call(inputs, **{name: inputs[name].bfloat16()})


def test_mixed_devices(inputs):
    with pytest.raises(ValueError, match=r"teacher_logits must be on the student_logits' device cpu, got meta"):
        call(inputs, teacher_logits=torch.empty(4, 6, device="meta"))
    with pytest.raises(ValueError, match=r"target must be on the student_logits' device cpu, got meta"):
        call(inputs, target=torch.empty(4, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("name", ["student_logits", "teacher_logits", "reference_logits"])
def test_non_floating_logits(inputs, name):
    with pytest.raises(TypeError, match=rf"{name} must be a floating tensor .* got torch.int64"):
        call(inputs, **{name: torch.zeros(4, 6, dtype=torch.long)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_target(inputs, dtype):
    with pytest.raises(TypeError, match=rf"target must be an integer tensor of class indices, got {dtype}"):
        call(inputs, target=torch.zeros(4, dtype=dtype))


CPU_BACKENDS = [name for name, status in smskd_fast.available_backends().items()
                if status and registry.get_backend(name).supports(torch.device("cpu"))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [6, -1, 100])
def test_target_out_of_range(inputs, bad, backend):
    """smskd_loss leaves the values to the backend: each CPU backend names the bad value the same way."""
    target = inputs["target"].clone()
    target[2] = bad
    with pytest.raises(ValueError, match=rf"target values must be in \[0, 6\) or equal ignore_index=-100, "
                                         rf"found {bad} at target\[2\]"):
        call(inputs, target=target, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_target_out_of_range_is_named_at_its_row(backend):
    """(B, T) targets: every CPU backend names the first bad value at its row of the (B*T, C) rows the
    loss is computed on, as the compiled op does."""
    student, target, teacher, reference = make_logits((2, 3, 6), dtype=torch.float32)
    target = target.clone()
    target[1, 0], target[1, 2] = 9, -7
    with pytest.raises(ValueError, match=r"found 9 at target\[3\]$"):
        smskd_fast.smskd_loss(student, target, teacher, reference, backend=backend)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(inputs, temperature):
    with pytest.raises(ValueError, match="temperature must be"):
        call(inputs, temperature=temperature)


def test_unknown_reduction(inputs):
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        call(inputs, reduction="avg")


def test_unknown_weighting(inputs):
    with pytest.raises(ValueError, match=r"weighting must be one of .*inverse_tcp.*got 'uniform'"):
        call(inputs, weighting="uniform")


def test_unknown_backend(inputs):
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \[.*'reference'.*\], got 'fast'"):
        smskd_fast.smskd_loss(inputs["student_logits"], inputs["target"], backend="fast")


class UnbuiltBackend:
    """A registered backend that cannot run, standing in for e.g. cuda on a CPU machine."""

    name = "unbuilt"

    def status(self):
        return BackendStatus(False, "built without its kernels")

    def supports(self, device):
        return True

    def rows(self, inputs, options):
        raise AssertionError("an unavailable backend must never run")


def test_unavailable_backend_says_why(inputs, monkeypatch):
    monkeypatch.setattr(registry, "_BACKENDS", {**registry._BACKENDS, "unbuilt": (0, UnbuiltBackend())})
    monkeypatch.setattr(registry, "_STATUS", {})
    monkeypatch.setattr(registry, "_AUTO_CANDIDATES", {})
    with pytest.raises(RuntimeError, match=r"backend 'unbuilt' is not available: built without its kernels"):
        smskd_fast.smskd_loss(inputs["student_logits"], inputs["target"], backend="unbuilt")
    assert smskd_fast.available_backends()["unbuilt"].reason == "built without its kernels"
    # auto skips it although it is the most preferred
    smskd_fast.smskd_loss(inputs["student_logits"], inputs["target"])


def test_backend_for_another_device(inputs):
    with pytest.raises(ValueError, match=r"backend .cuda. does not run tensors on device cpu; use backend=.auto."):
        smskd_fast.smskd_loss(inputs["student_logits"], inputs["target"], backend="cuda")


@pytest.mark.parametrize("weighting", ["inverse_tcp", "tcp"])
def test_tcp_weighting_without_teacher(inputs, weighting):
    with pytest.raises(ValueError, match=rf"weighting='{weighting}' .* needs teacher_logits"):
        call(inputs, teacher_logits=None, weighting=weighting)
    call(inputs, teacher_logits=None, weighting="constant")  # allowed: needs no TCP


@pytest.mark.parametrize("name", ["ce_weight", "kd_weight", "ref_weight"])
def test_non_finite_loss_weight(inputs, name):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number, got nan"):
        call(inputs, **{name: float("nan")})


def test_kd_loss_errors():
    student = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="teacher_logits must be a tensor for kd_loss, got None"):
        smskd_fast.kd_loss(student, None)
    with pytest.raises(ValueError, match="teacher_logits must have the student_logits' shape"):
        smskd_fast.kd_loss(student, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="temperature must be"):
        smskd_fast.kd_loss(student, student, temperature=0)


def test_zero_dimensional_logits():
    with pytest.raises(ValueError, match=r"student_logits must have shape \(\.\.\., C\) with C >= 1, got \(\)"):
        smskd_fast.smskd_loss(torch.tensor(1.0), torch.tensor(0))


class Float32OnlyBackend(UnbuiltBackend):
    """An available backend that refuses float64, like the triton one."""

    name = "float32_only"

    def status(self):
        return BackendStatus(True, "test stand-in")

    def supports_dtype(self, dtype):
        return dtype != torch.float64


def test_auto_passes_over_backends_that_refuse_the_dtype(monkeypatch):
    monkeypatch.setattr(registry, "_BACKENDS", {**registry._BACKENDS, "float32_only": (0, Float32OnlyBackend())})
    monkeypatch.setattr(registry, "_STATUS", {})
    monkeypatch.setattr(registry, "_AUTO_CANDIDATES", {})
    student = torch.randn(3, 4, dtype=torch.float64)
    chosen = registry.resolve_backend("auto", student.device, torch.float64, 4)
    assert chosen.name != "float32_only"
    assert registry.resolve_backend("auto", student.device, torch.float32, 4).name == "float32_only"


@pytest.mark.parametrize("name", ["teacher_logits", "reference_logits"])
def test_companion_logits_that_require_grad_get_a_warning_and_no_gradient(inputs, name):
    """The loss is differentiable with respect to the student only, on every backend: a teacher trained jointly
    would silently get nothing, so a call with grad mode on says so; detached or under no_grad it is quiet."""
    companion = inputs[name].clone().requires_grad_()
    student = inputs["student_logits"].clone().requires_grad_()
    with pytest.warns(UserWarning, match=f"{name} requires grad, but the loss is differentiable with respect to "
                                         f"student_logits only"):
        call(inputs, student_logits=student, **{name: companion}).loss.backward()
    assert companion.grad is None and student.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(inputs, student_logits=student, **{name: companion.detach()})
        with torch.no_grad():
            call(inputs, student_logits=student, **{name: companion})


@pytest.mark.parametrize("ignore_index", [-100.7, None, "x", torch.tensor(-100), 2 ** 70, True])
def test_ignore_index_must_be_an_integer(inputs, ignore_index):
    with pytest.raises(TypeError, match=r"ignore_index must be an integer in int64's range"):
        call(inputs, ignore_index=ignore_index)


@pytest.mark.parametrize("temperature", [1e-300, 1e300, 2.0 ** -64])
def test_temperature_outside_float32s_reach(inputs, temperature):
    with pytest.raises(ValueError, match=r"temperature must be in \[2\*\*-63, 2\*\*63\]"):
        call(inputs, temperature=temperature)


def test_numpy_numbers_are_numbers(inputs):
    """Configs and sweeps hand numpy scalars: they are accepted and give the Python numbers' loss."""
    numpy = pytest.importorskip("numpy")
    expected = call(inputs, temperature=4.0, kd_weight=0.5, ignore_index=-100).loss
    got = call(inputs, temperature=numpy.float32(4.0), kd_weight=numpy.float64(0.5),
               ignore_index=numpy.int64(-100)).loss
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_teacher_topk_must_be_a_topk_teacher(inputs):
    with pytest.raises(TypeError, match="teacher_topk must be a smskd_fast.TopKTeacher .* got tuple"):
        call(inputs, teacher_logits=None, teacher_topk=(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.long)))
