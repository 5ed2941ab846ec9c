"""The kept-class bitmask of a top-k teacher, the form GPU kernels test "is class j kept?" in.

Per row, ceil(C/32) int32 words; class j is kept when bit j % 32 of word j // 32
is set. It is built on the indices' device by a scatter_add of 1 << (j & 31) into
zeros: the indices of a row are distinct (validation refuses duplicates), so the
sum of distinct powers of two is their bitwise or (bit 31 is int32's sign bit,
and two's-complement addition keeps the or exact). An index outside [0, C) sets no bit and is
redirected to word 0 (adding 0), so the scatter itself can never fault.
"""
from __future__ import annotations

import torch

BITS_PER_WORD = 32


def kept_class_bitmask(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, ceil(C/32)) int32 words with bit j set in row i iff j is in indices[i] (an (N, k) integer tensor)."""
    if indices.dim() != 2:
        raise ValueError(f"indices must have shape (N, k), got {tuple(indices.shape)}")
    words = (num_classes + BITS_PER_WORD - 1) // BITS_PER_WORD
    indices = indices.long()
    inside = (indices >= 0) & (indices < num_classes)
    word = torch.where(inside, indices // BITS_PER_WORD, torch.zeros_like(indices))
    bit = torch.where(inside, torch.ones_like(indices) << (indices & (BITS_PER_WORD - 1)), torch.zeros_like(indices))
    bit = torch.where(bit >= 2**31, bit - 2**32, bit)  # bit 31 as int32's sign bit, exactly
    bits = torch.zeros((indices.shape[0], words), dtype=torch.int32, device=indices.device)
    return bits.scatter_add_(1, word, bit.to(torch.int32))
