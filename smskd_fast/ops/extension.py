"""Loads the compiled operator library smskd_fast._C and remembers why it failed.

Importing _C runs its TORCH_LIBRARY registrations (the smskd_fast:: operators).
A missing or broken build is not fatal: the reference backend still works, and
available_backends() reports the reason.
"""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libtorch and libc10, which _C links against)

_LOAD_ERROR: str | None = None

try:
    importlib.import_module("smskd_fast._C")
except ImportError as error:  # not built, or built against another torch
    _LOAD_ERROR = f"smskd_fast._C could not be imported: {error}"


def extension_loaded() -> bool:
    """True when the compiled operator library is loaded."""
    return _LOAD_ERROR is None


def extension_error() -> str | None:
    """Why the compiled library is not loaded, or None when it is."""
    return _LOAD_ERROR
