"""Tensors batched by vmap, whose values neither a host check nor an in-place op on an unbatched tensor may
take: torch.func's (vmap, and the transforms built on it) and autograd's own (is_grads_batched, as
torch.autograd.functional.jacobian(vectorize=True) runs backward)."""
from __future__ import annotations

import torch

__all__ = ["vmap_batched"]


def vmap_batched(tensor: torch.Tensor) -> bool:
    """Whether tensor is wrapped by a torch.func transform or batched by autograd's legacy vmap."""
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor) or \
        torch._C._functorch.is_legacy_batchedtensor(tensor)
