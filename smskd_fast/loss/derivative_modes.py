"""Derivatives the fused kernels do not compute, and the backend a call then runs.

The fused backends (cpu, cuda, triton) write d loss / d student in their forward pass and give it to
reverse-mode autograd (loss.backward(), torch.autograd.grad). Forward-mode AD (torch.autograd.forward_ad,
torch.func.jvp) would get no tangent from them, a silent zero, and torch.func's reverse-mode transforms
(grad, vjp, jacrev) cannot run their autograd. The reference backend is plain PyTorch and supports both:
"auto" runs it for such calls, and a fused backend named explicitly refuses them with an error that says
so. torch.func.vmap alone runs every backend (the fused ones through their ops' batching rule, ops/vmap_rules.py).
fused_linear_smskd_loss is itself an autograd.Function that computes every gradient in its forward pass,
whatever the backend: it refuses every torch.func transform and forward-mode tangent (check_reverse_mode_only).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad

__all__ = ["unsupported_derivative", "backend_for_derivatives", "check_reverse_mode_only"]

REFERENCE = "reference"


def _has_forward_tangent(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether one of tensors carries a forward-mode tangent (none can without a dual level: one flag read)."""
    return forward_ad._current_level >= 0 and any(
        tensor is not None and forward_ad.unpack_dual(tensor).tangent is not None for tensor in tensors)


def unsupported_derivative(*logits: Optional[torch.Tensor]) -> Optional[str]:
    """What this call asks of the loss that the fused kernels lack (None: nothing): a forward-mode
    tangent on one of the logits (the student's, or the teacher's or reference's, on which the fused
    kernels' autograd would fail), or a torch.func transform other than vmap around the call. Cheap
    when neither is in use (two flags read). Also while torch.compile traces: Dynamo traces jvp, grad
    and forward_ad inside a compiled function, and the kernels' tangent would be as missing there."""
    if _has_forward_tangent(*logits):
        return _FORWARD_MODE
    if torch._C._are_functorch_transforms_active():
        return _transform_the_kernels_lack()
    return None


_FORWARD_MODE = "forward-mode AD (torch.func.jvp or jacfwd, torch.autograd.forward_ad)"


@torch.compiler.assume_constant_result
def _transform_the_kernels_lack() -> Optional[str]:
    """The torch.func transform around the call that the fused kernels lack (jvp, grad), or None (vmap
    alone, or functionalize). A constant of the traced graph under torch.compile: Dynamo cannot trace the
    interpreter stack, and the transforms around a traced call are fixed by the code it traces."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    transforms = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
    if TransformType.Jvp in transforms:
        return _FORWARD_MODE
    if TransformType.Grad in transforms:
        return "torch.func's reverse mode (grad, vjp, jacrev)"
    return None


def backend_for_derivatives(backend: str, api: str, *logits: Optional[torch.Tensor]) -> str:
    """backend, or the reference for "auto" when the call asks for a derivative the fused kernels lack
    (unsupported_derivative of the call's logits, the student's first); a fused backend named explicitly
    then raises NotImplementedError (it would return a wrong tangent or fail inside autograd)."""
    if backend == REFERENCE:
        return backend
    needed = unsupported_derivative(*logits)
    if needed is None:
        return backend
    if backend == "auto":
        return REFERENCE
    raise NotImplementedError(
        f"{api}: backend={backend!r} does not support {needed}: its kernels give the gradient to reverse-mode "
        "autograd only (loss.backward(), torch.autograd.grad); use backend='reference' or 'auto' for this call"
    )


def check_reverse_mode_only(api: str, *differentiable: Optional[torch.Tensor]) -> None:
    """Refuses, with an error that says what to do instead, a torch.func transform around an API that is
    an autograd.Function computing its gradients in forward, and a forward-mode tangent on one of its
    differentiable inputs (autograd.Function would fail on either with an error about its own methods;
    under torch.compile the tangent would be missing)."""
    if torch._C._are_functorch_transforms_active() or _has_forward_tangent(*differentiable):
        raise NotImplementedError(
            f"{api}: torch.func transforms (vmap, grad, jvp, ...) and forward-mode AD are not supported: it "
            "computes its gradients in the forward pass for reverse-mode autograd (loss.backward(), "
            "torch.autograd.grad); for them, compute the logits and call smskd_loss(..., backend='reference')"
        )
