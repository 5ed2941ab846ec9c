"""backend="auto" on CUDA tensors: the cuda or the triton backend, whichever measured faster.

The choice comes from a table of measurements, per GPU name, dtype and number
of classes C (benchmarks/gpu/measure_backend_choice.py writes it): a shape takes
the winner measured at the nearest C (in log scale) for its dtype on this GPU.
The table is gpu_choice_table.json beside this module, or the file named by
SMSKD_FAST_GPU_CHOICE_TABLE. Where this GPU was never measured, "cuda" is
taken: it needs no JIT compilation on first use. SMSKD_FAST_GPU_BACKEND=cuda or
=triton forces one. Works whether or not the triton backend is registered.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

GPU_BACKENDS = ("cuda", "triton")
UNMEASURED_DEFAULT = "cuda"
# A backend must be this much faster than UNMEASURED_DEFAULT to be chosen over it: closer
# timings are within run-to-run noise, and the default needs no JIT compilation on first use.
TIE_MARGIN = 0.05
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_choice_table.json")

# {gpu name: {dtype name: {C as str: backend}}}
ChoiceTable = Dict[str, Dict[str, Dict[str, str]]]


def table_path() -> str:
    """Where the measured table is read from."""
    return os.environ.get("SMSKD_FAST_GPU_CHOICE_TABLE") or TABLE_PATH


@functools.lru_cache(maxsize=None)
def load_table(path: str) -> ChoiceTable:
    """The measured winners in the file at path; empty when there is none."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("devices", {})


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


def nearest_measured(winners: Sequence[Tuple[int, str]], num_classes) -> Optional[str]:
    """The winner measured at the C nearest to num_classes in log scale, of (C, winner) pairs sorted by C;
    None if there are none. Only comparisons of num_classes: under torch.compile(dynamic=True) it may be
    symbolic, and each comparison becomes a guard (sqrt(c_i c_j) is the log-scale midpoint of c_i, c_j)."""
    for (low, winner), (high, _) in zip(winners, winners[1:]):
        if num_classes * num_classes < low * high:
            return winner
    return winners[-1][1] if winners else None


def pick_winner(timings_ms: Dict[str, float]) -> str:
    """The fastest backend of {backend: ms}, UNMEASURED_DEFAULT when it is within TIE_MARGIN of it."""
    fastest = min(timings_ms, key=timings_ms.get)
    default_ms = timings_ms.get(UNMEASURED_DEFAULT)
    if default_ms is not None and default_ms <= timings_ms[fastest] * (1 + TIE_MARGIN):
        return UNMEASURED_DEFAULT
    return fastest


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@torch.compiler.assume_constant_result
def _forced_and_measured(dtype: torch.dtype, index: Optional[int]) -> Tuple[Optional[str], Tuple[Tuple[int, str], ...]]:
    """SMSKD_FAST_GPU_BACKEND and the measured (C, winner) pairs for dtype of GPU `index` (None: the
    current one, as for a tensor on "cuda"), sorted by C.

    Constants for torch.compile: when a traced call of the loss resolves backend="auto",
    dynamo runs this eagerly (it reads a file and asks the driver for the GPU's name, which
    it could not trace), so the chooser adds no graph break."""
    table = load_table(table_path()).get(_device_name(torch.cuda.current_device() if index is None else index), {})
    entries = table.get(dtype_name(dtype), {})
    return os.environ.get("SMSKD_FAST_GPU_BACKEND"), tuple(sorted((int(c), w) for c, w in entries.items()))


def choose_gpu_backend(candidates: List[str], dtype: torch.dtype, num_classes: int,
                       device: Optional[torch.device] = None) -> str:
    """The AutoChooser for device type "cuda" (see registry.register_auto_chooser): the winner measured on
    the GPU the inputs are on (a machine may hold GPUs of several models), at the nearest measured C."""
    gpu = [name for name in candidates if name in GPU_BACKENDS]
    if not gpu:
        return candidates[0]
    if len(gpu) == 1:
        return gpu[0]
    forced, measured = _forced_and_measured(dtype, None if device is None else device.index)
    if forced in gpu:
        return forced
    winner = nearest_measured(measured, num_classes)
    if winner in gpu:
        return winner
    return UNMEASURED_DEFAULT if UNMEASURED_DEFAULT in gpu else gpu[0]
