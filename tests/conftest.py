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
def cuda_extension_binary():
    """Path of the loaded smskd_fast._C when it was built with the CUDA kernels (GPU or not), else None:
    the SASS checks read this binary, the one CI built, instead of compiling kernels/ again."""
    import importlib.util

    from smskd_fast.ops import registration
    from smskd_fast.ops.extension import extension_loaded

    if not extension_loaded() or not torch._C._dispatch_has_kernel_for_dispatch_key(registration.OP_NAME, "CUDA"):
        return None
    return importlib.util.find_spec("smskd_fast._C").origin
