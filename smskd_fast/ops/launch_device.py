"""The CUDA device a Triton kernel runs on: Triton launches on the current device and its current stream,
not on its arguments' device, so every Triton launch of the package goes through on_device_of."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["on_device_of"]

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
