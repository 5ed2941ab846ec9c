"""Shared fixtures: deterministic random logits for the loss tests."""
from __future__ import annotations

import pytest
import torch

# Per-test timeout and progress file for time-boxed runs (off unless their variables are set).
pytest_plugins = ("run_guard",)


def make_logits(shape, dtype=torch.float64, *, seed=0, scale=3.0, with_reference=True,
                num_classes=None, ignore_every=0):
    """Student, target, teacher and reference of the given (..., C) shape."""
    generator = torch.Generator().manual_seed(seed)
    c = shape[-1]

    def logits():
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    student, teacher = logits(), logits()
    reference = logits() if with_reference else None
    target = torch.randint(0, num_classes or c, shape[:-1], generator=generator)
    if ignore_every:
        flat = target.view(-1)
        flat[::ignore_every] = -100
    return student, target, teacher, reference


@pytest.fixture
def logits_factory():
    return make_logits


@pytest.fixture
def two_threads():
    """Two torch threads, so that rows fewer than threads take the cpu kernel's column-split path (a row of
    C >= 2 * threads * 1024 = 4096 then has its columns split among them, on any machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cuda_extension_binary():
    """Path of the loaded smskd_fast._C when it was built with the CUDA kernels (GPU or not), else None:
    the SASS checks read this binary, the one CI built, instead of compiling kernels/ again."""
    import importlib.util

    from smskd_fast.ops import registration
    from smskd_fast.ops.extension import extension_loaded

    if not extension_loaded() or not torch._C._dispatch_has_kernel_for_dispatch_key(registration.OP_NAME, "CUDA"):
        return None
    return importlib.util.find_spec("smskd_fast._C").origin


_SAME_WIDTH_INTEGER = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                       torch.float16: torch.int16}
_SIGNALING_NAN_BITS = {torch.float64: 0x7FF0000000000001, torch.float32: 0x7F800001, torch.bfloat16: 0x7F81,
                       torch.float16: 0x7C01}


def signaling_nan(dtype: torch.dtype) -> torch.Tensor:
    """A 0-d signaling NaN of dtype: any arithmetic on it, even x 1, gives a quiet NaN (other bits), so an
    element that keeps these bits was not computed on."""
    integer = _SAME_WIDTH_INTEGER[dtype]
    return torch.tensor(_SIGNALING_NAN_BITS[dtype], dtype=integer).view(dtype)


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """got and want hold the same bits (NaNs included, which torch.equal calls different)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    integer = _SAME_WIDTH_INTEGER[got.dtype]
    assert torch.equal(got.view(integer), want.view(integer)), what

