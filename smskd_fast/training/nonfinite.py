"""What a training step does when its loss is NaN or inf: the stage's `nonfinite` policy.

"stop" ends the run with a NonFiniteLossError naming the stage, epoch, step and the
batch's sample indices. "skip" drops the step (no backward, no optimizer step) and
restores every buffer the forward pass touched (BatchNorm statistics, CRD memory
banks), so a skipped batch leaves no trace in the model; the trainer counts it.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["NonFiniteLossError", "BufferSnapshot", "describe_samples", "stop_or_skip"]

MAX_LISTED_SAMPLES = 64


class NonFiniteLossError(FloatingPointError):
    """A training loss was NaN or inf (policy "stop"), or every step of an epoch was (policy "skip")."""


class BufferSnapshot:
    """Copies of the buffers of `modules`, taken before a forward pass; restore() puts them back."""

    def __init__(self, modules: Iterable[nn.Module]):
        self._pairs = [(buffer, buffer.detach().clone()) for module in modules for buffer in module.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, saved in self._pairs:
            buffer.copy_(saved)


def describe_samples(indices: torch.Tensor) -> str:
    """The training-set indices of a batch, listed in full up to MAX_LISTED_SAMPLES."""
    values: List[int] = [int(i) for i in indices.reshape(-1).tolist()]
    shown: Sequence[int] = values[:MAX_LISTED_SAMPLES]
    more = f" ... ({len(values)} samples in all)" if len(values) > len(shown) else ""
    return "[" + ", ".join(map(str, shown)) + more + "]"


def stop_or_skip(where: str, remedy: str, snapshot: Optional[BufferSnapshot], log: Callable[[str], None]) -> None:
    """The policy for a non-finite step: "stop" (no snapshot) raises NonFiniteLossError saying where and
    what to do; "skip" puts back the buffers the forward pass updated and logs the skipped step."""
    if snapshot is None:
        raise NonFiniteLossError(f"{where}. {remedy}")
    snapshot.restore()
    log(f"skipped: {where}")
