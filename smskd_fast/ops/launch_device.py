"""How the package launches a Triton kernel: on the CUDA device of its arguments (Triton launches on the
current device and its current stream, not on its arguments' device, so every Triton launch goes through
on_device_of), and with the compiler options TRITON_COMPILE_OPTIONS, stated rather than left to Triton's
defaults."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["TRITON_COMPILE_OPTIONS", "on_device_of"]

# Fused multiply-add contraction on: the kernels' arithmetic, their MUFU/FMA budgets
# (benchmarks/mufu_report.py), the AOT reports and the GPU timings all assume it. Triton <= 3.9
# enables it by default, but 3.9 warns (once per process, at the first compile of a kernel launched
# without it) that 3.10 turns it off (TRITON_DEFAULT_FP_FUSION). Passed at each launch, so a user's
# own kernels keep Triton's default; TRITON_FORCE_DISABLE_FP_FUSION=1 still overrides it.
TRITON_COMPILE_OPTIONS = {"enable_fp_fusion": True}

_REAL_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def on_device_of(tensor: torch.Tensor):
    """A context in which Triton launches on tensor's CUDA device. Logits on cuda:1 while cuda:0 is current
    would otherwise be read on the wrong device, which the compiled ops' CUDAGuard prevents for them.
    Nothing to switch with one visible device (or none, as under the interpreter), so the usual call pays
    one cached device count. Nothing to switch while tracing either (fake or functional tensors: the
    launch is recorded, not run, and a fake tensor's device need not exist here)."""
    device = tensor.device
    if (device.type != "cuda" or type(tensor) not in _REAL_TENSOR_TYPES or torch.cuda.device_count() < 2
            or device.index == torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)
