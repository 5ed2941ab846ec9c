"""The backend registry: which loss backends exist, which can run, and which "auto" picks.

A backend registers itself with a preference rank; backend="auto" takes, for the
device of the inputs, the most preferred available backend that supports it,
unless a chooser registered for that device type (e.g. one that measured which
GPU backend is faster per dtype and C) names another. Callers never change when
a backend is added.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from smskd_fast.backends.base import Backend, BackendStatus

# A chooser gets (candidate names, dtype, number of classes) and returns one name.
AutoChooser = Callable[[List[str], torch.dtype, int, torch.device], str]  # (candidates, dtype, C, device)

_BACKENDS: Dict[str, Tuple[int, Backend]] = {}
_CHOOSERS: Dict[str, AutoChooser] = {}
_STATUS: Dict[str, BackendStatus] = {}  # filled on first use: availability is fixed per process
# backend="auto"'s candidates per (device, dtype, topk), most preferred first: they follow from the
# registrations and the statuses alone, and recomputing them took ~12 us of every call.
_AUTO_CANDIDATES: Dict[Tuple[torch.device, torch.dtype, bool], List[str]] = {}


def register_backend(backend: Backend, *, rank: int) -> None:
    """Adds a backend; lower rank is preferred by backend="auto"."""
    _BACKENDS[backend.name] = (rank, backend)
    _STATUS.pop(backend.name, None)
    _AUTO_CANDIDATES.clear()


def backend_status(name: str) -> BackendStatus:
    """The (cached) status of a registered backend."""
    if name not in _STATUS:
        _STATUS[name] = BackendStatus(*_probe_status(name))
    return _STATUS[name]


@torch.compiler.assume_constant_result
def _probe_status(name: str) -> Tuple[bool, str]:
    """Asks the backend whether it can run, as constants: when the first call of the loss is traced
    by torch.compile, dynamo runs this eagerly instead of breaking the graph at the probes' calls
    into torch._C and triton that it cannot trace."""
    status = _BACKENDS[name][1].status()
    return status.available, status.reason


def register_auto_chooser(device_type: str, chooser: AutoChooser) -> None:
    """Lets backend="auto" choose among several available backends of one device type."""
    _CHOOSERS[device_type] = chooser


def backend_names() -> List[str]:
    """All registered backend names, most preferred first."""
    return [name for name, _ in sorted(_BACKENDS.items(), key=lambda item: item[1][0])]


def available_backends() -> Dict[str, BackendStatus]:
    """Every registered backend with whether it can run here and why not."""
    return {name: backend_status(name) for name in backend_names()}


def supports_topk(backend: Backend) -> bool:
    """Whether a backend accepts the top-k teacher form."""
    return bool(getattr(backend, "supports_topk", False))


def supports_dtype(backend: Backend, dtype: torch.dtype) -> bool:
    """Whether a backend computes inputs of this dtype (backends without the method take all four)."""
    check = getattr(backend, "supports_dtype", None)
    return True if check is None else bool(check(dtype))


def get_backend(name: str, device: Optional[torch.device] = None, *, topk: bool = False) -> Backend:
    """The backend called name; an error that says why when it cannot run (on device, with a top-k teacher)."""
    if name not in _BACKENDS:
        raise ValueError(
            f"backend must be 'auto' or one of {backend_names()}, got {name!r}"
        )
    backend = _BACKENDS[name][1]
    if device is not None and not backend.supports(device):
        raise ValueError(
            f"backend {name!r} does not run tensors on device {device}; "
            f"use backend='auto' or one that supports {device.type}"
        )
    status = backend_status(name)
    if not status.available:
        raise RuntimeError(f"backend {name!r} is not available: {status.reason}")
    if topk and not supports_topk(backend):
        raise ValueError(f"backend {name!r} does not accept teacher_topk; use backend='auto' or one of "
                         f"{[n for n in backend_names() if supports_topk(_BACKENDS[n][1])]}")
    return backend


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, num_classes: int, *,
                    topk: bool = False) -> Backend:
    """The backend to run for inputs on device (with a top-k teacher when topk); name may be "auto"."""
    if name != "auto":
        return get_backend(name, device, topk=topk)
    if torch.compiler.is_compiling():  # traced once per graph; no module state read or written
        candidates = _auto_candidates(device, dtype, topk)
    else:
        key = (device, dtype, topk)
        candidates = _AUTO_CANDIDATES.get(key)
        if candidates is None:
            candidates = _AUTO_CANDIDATES[key] = _auto_candidates(device, dtype, topk)
    chooser: Optional[AutoChooser] = _CHOOSERS.get(device.type)
    chosen = chooser(candidates, dtype, num_classes, device) if chooser and len(candidates) > 1 else candidates[0]
    return _BACKENDS[chosen][1]


def _auto_candidates(device: torch.device, dtype: torch.dtype, topk: bool) -> List[str]:
    """The available backends that run these inputs, most preferred first."""
    return [
        candidate
        for candidate in backend_names()
        if _BACKENDS[candidate][1].supports(device) and backend_status(candidate).available
        and (not topk or supports_topk(_BACKENDS[candidate][1]))
        and supports_dtype(_BACKENDS[candidate][1], dtype)
    ]
