"""Small decoder-only transformers for the byte-level language-model example.

A model maps tokens (B, L) to next-token logits (B, L, V). It also exposes
`hidden_states(tokens)` (B, L, width) and its output projection `head` (a bias-free
nn.Linear), so that a stage can compute the loss with fused_linear_smskd_loss
straight from hidden states, without materialising the logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position i attends to positions <= i."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyCausalLM(nn.Module):
    """Token and learned position embeddings, `layers` blocks, a final norm and a linear head."""

    def __init__(self, width: int, layers: int, heads: int, vocabulary: int, max_positions: int = 512):
        super().__init__()
        self.max_positions = max_positions
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Embedding(max_positions, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final normalised hidden states (B, L, width) of tokens (B, L)."""
        length = tokens.shape[-1]
        if length > self.max_positions:
            raise ValueError(f"sequences of {length} tokens exceed the model's {self.max_positions} positions")
        positions = torch.arange(length, device=tokens.device)
        return self.norm(self.blocks(self.embed(tokens) + self.position(positions)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_states(tokens))


def _check_channels(in_channels: int) -> None:
    if in_channels != 1:
        raise ValueError(f"language models read one stream of token ids, not {in_channels} input channels")


def tiny_lm_large(num_classes: int = 256, in_channels: int = 1) -> TinyCausalLM:
    """The teacher: width 128, 4 blocks, 4 heads (about 0.92 M parameters at 256 tokens)."""
    _check_channels(in_channels)
    return TinyCausalLM(128, 4, 4, num_classes)


def tiny_lm_small(num_classes: int = 256, in_channels: int = 1) -> TinyCausalLM:
    """The student: width 48, 1 block, 2 heads (about 0.08 M parameters at 256 tokens)."""
    _check_channels(in_channels)
    return TinyCausalLM(48, 1, 2, num_classes)
