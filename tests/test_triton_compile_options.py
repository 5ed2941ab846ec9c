"""Every Triton launch of the package states its compiler options (ops/launch_device.py TRITON_COMPILE_OPTIONS).

Fused multiply-add contraction is what the kernels' arithmetic, the MUFU budgets and the GPU timings assume.
Triton 3.9 (torch 2.15's) warns at the first compile of a kernel launched without enable_fp_fusion that 3.10
turns it off by default. The launches are recorded at the kernel object's run(), where Triton's launcher and
its interpreter both receive the launch keywords, so a launch site that forgets the options fails here.
Where the cases run: tests/triton_interpreter.py.
"""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from smskd_fast.ops.launch_device import TRITON_COMPILE_OPTIONS
from test_grad_scale_triton import OPTIONS, dense_op, topk_op, topk_on_device
from test_triton_backend import make_inputs
from topk_cases import make_inputs as make_topk_inputs
from triton_interpreter import DEVICE, ON_GPU, needs_kernels, reruns_under_interpreter, run_under_interpreter

EVERY_KERNEL = {"_smskd_rows_tile_kernel", "_smskd_rows_online_kernel", "_smskd_topk_rows_kernel",
                "_scale_rows_kernel", "_scale_all_rows_kernel"}


@pytest.fixture
def recorded_launches(monkeypatch):
    """{kernel name: [launch keywords, ...]} of the package's Triton launches while the test runs."""
    from smskd_fast.backends.triton import kernels

    launches = defaultdict(list)
    kernel_class = type(kernels._smskd_rows_tile_kernel)  # JITFunction, or InterpretedFunction when interpreted
    run = kernel_class.run

    def recording_run(self, *args, **kwargs):
        launches[self.fn.__name__].append(kwargs)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", recording_run)
    return launches


@needs_kernels
def test_every_launch_states_the_compile_options(recorded_launches):
    from smskd_fast.ops.scale_rows import launch_scale_rows

    for num_classes in (40, 4100):  # one register tile; the online kernel's column blocks
        student, target, teacher, reference = make_inputs(3, num_classes, seed=num_classes)
        dense_op(student, target, teacher, reference)
    topk_op(*topk_on_device(*make_topk_inputs(3, 300, 8, torch.float32, temperature=OPTIONS.temperature)))
    launch_scale_rows(torch.ones(3, 5, device=DEVICE), torch.tensor([1.0, 0.5, 2.0], device=DEVICE))
    launch_scale_rows(torch.ones(3, 5, device=DEVICE), torch.tensor(0.5, device=DEVICE))

    expected = EVERY_KERNEL | ({"_check_targets_kernel"} if ON_GPU else set())  # interpreted: checked on the host
    assert set(recorded_launches) == expected
    for name, launches in recorded_launches.items():
        for keywords in launches:
            stated = {key: keywords.get(key) for key in TRITON_COMPILE_OPTIONS}
            assert stated == TRITON_COMPILE_OPTIONS, f"{name} was launched with {stated}"


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file under TRITON_INTERPRET=1 (tests/triton_interpreter.py)."""
    run_under_interpreter(__file__)
